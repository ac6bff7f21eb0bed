"""Dense CRF on a converted DeepLab model over the real VOC subset: mIoU without/with CRF, a grid search.

  python benchmarks/crf_search.py [--num_search_images=10] [--w1=3,4,5] [--theta_alpha=50,67,90]
      [--theta_beta=3,5] [--max_images=0] [--normalization=symmetric] [--cache_dir=/tmp/deeplab_crf_search]

1. Converts `../shared/data/official_tflite/deeplabv3_mnv2_pascal_quant.tflite` (MobileNetV2 DeepLab V3,
   74.26% on VOC val as published) once with `deeplab_jax.convert.convert_and_save` and
   `configs/voc_mobilenetv2.py` into `<cache_dir>/converted` (reused when it is there).
2. Every image of `voc2012_train_subset/ImageSets/Segmentation/train.txt` (330 real VOC images) is padded
   top-left to 513x513 with the model's mean pixel and run at output stride 16, one scale, no flip, through
   `deeplab_jax.evaluate.predict_probabilities`; the probabilities are cropped to the image.
3. The CRF (`deeplab_jax.crf.dense_crf`) runs on the crop and the raw image. To compile once per size
   bucket rather than once per image size, the crop is padded to the next multiple of 128 and the padding is
   masked out with `valid_mask` (it never enters the CRF: the result is the crop's own, tested in
   tests/crf_test.py); the parameters are traced, so every setting reuses the compilation.
4. Grid search, as the papers did (w1, theta_alpha, theta_beta; w2=3, theta_gamma=1 fixed, 10 iterations;
   they used 100 val images): on the first `num_search_images` images, prints a table of mIoU per setting.
5. One pass over all images: mIoU (21 classes, `deeplab_jax.metrics`, void ignored) without CRF, with the
   DeepLab-v2 defaults (w1=4, theta_alpha=67, theta_beta=3, w2=3, theta_gamma=1) and with the best setting
   of the grid. The search images are part of the 330: say so when quoting the "best" figure.
"""
import argparse
import dataclasses
import itertools
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import voc_mobilenetv2  # noqa: E402
from deeplab_jax import checkpoint  # noqa: E402
from deeplab_jax import convert  # noqa: E402
from deeplab_jax import crf  # noqa: E402
from deeplab_jax import evaluate  # noqa: E402
from deeplab_jax import metrics  # noqa: E402
from deeplab_jax.models import create_model  # noqa: E402
from deeplab_jax.models import mean_pixel  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / 'shared' / 'data'
MODEL = SHARED / 'official_tflite' / 'deeplabv3_mnv2_pascal_quant.tflite'
VOC = SHARED / 'voc2012_train_subset'
CROP = 513
OUTPUT_STRIDE = 16
BUCKET = 128
NUM_CLASSES = 21


def floats(text: str) -> tuple:
  return tuple(float(value) for value in text.split(','))


def load_model(cache_dir: Path):
  """(model, variables, config) of the converted quantized MobileNetV2 model (converted on first use)."""
  config = voc_mobilenetv2.get_config('1.0')
  converted = cache_dir / 'converted'
  if not (converted / checkpoint.CHECKPOINT_SUBDIR).is_dir():
    converted.mkdir(parents=True, exist_ok=True)
    convert.convert_and_save(str(MODEL), config, str(converted))
  checkpointer = checkpoint.Checkpointer(str(converted))
  variables, _ = checkpointer.read_variables(checkpointer.latest_step())
  model = create_model(config.model, output_stride=OUTPUT_STRIDE)
  return model, jax.tree_util.tree_map(jnp.asarray, variables), config


class Runner:
  """Model probabilities and CRF labels for one image at a time, compiled once per shape."""

  def __init__(self, model, variables, config, normalization: str):
    self._probabilities = jax.jit(lambda images: evaluate.predict_probabilities(
        model, variables, images, scales=(1.0,), flip=False))
    self._crf = jax.jit(lambda probabilities, images, valid, params: jnp.argmax(
        crf.dense_crf(probabilities, images, params, valid, normalization=normalization), -1))
    self._pad_pixel = np.asarray(mean_pixel(config.model), np.float32)

  def probabilities(self, image: np.ndarray) -> np.ndarray:
    """`[h, w, K]` float32 probabilities of the model on `image` padded top-left to 513x513."""
    height, width, _ = image.shape
    padded = np.broadcast_to(self._pad_pixel, (CROP, CROP, 3)).copy()
    padded[:height, :width] = image
    return np.asarray(self._probabilities(jnp.asarray(padded[None])))[0, :height, :width]

  def crf_labels(self, probabilities: np.ndarray, image: np.ndarray, params: crf.CRFParams) -> np.ndarray:
    """`[h, w]` CRF labels of the crop, run on it padded (masked) to the next multiple of 128."""
    height, width, _ = image.shape
    bucket = (-(-height // BUCKET) * BUCKET, -(-width // BUCKET) * BUCKET)
    probs = np.zeros(bucket + probabilities.shape[-1:], np.float32)
    probs[:height, :width] = probabilities
    pixels = np.zeros(bucket + (3,), np.uint8)
    pixels[:height, :width] = image
    valid = np.zeros(bucket, bool)
    valid[:height, :width] = True
    labels = self._crf(jnp.asarray(probs[None]), jnp.asarray(pixels[None]), jnp.asarray(valid[None]), params)
    return np.asarray(labels)[0, :height, :width]


def confusion(label: np.ndarray, prediction: np.ndarray) -> np.ndarray:
  labels = jnp.asarray(label[None], jnp.int32)  # uint8 would overflow in `label * num_classes`
  return np.asarray(metrics.confusion_matrix(labels, jnp.asarray(prediction[None], jnp.int32), NUM_CLASSES),
                    np.int64)


def load(image_id: str) -> tuple[np.ndarray, np.ndarray]:
  image = np.array(Image.open(VOC / 'JPEGImages' / f'{image_id}.jpg').convert('RGB'), np.uint8)
  label = np.array(Image.open(VOC / 'SegmentationClass' / f'{image_id}.png'), np.uint8)
  return image, label


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_search_images', type=int, default=10)
  parser.add_argument('--w1', type=floats, default=(3.0, 4.0, 5.0))
  parser.add_argument('--theta_alpha', type=floats, default=(50.0, 67.0, 90.0))
  parser.add_argument('--theta_beta', type=floats, default=(3.0, 5.0))
  parser.add_argument('--max_images', type=int, default=0, help='0: all images of train.txt')
  parser.add_argument('--normalization', choices=crf.NORMALIZATIONS, default='symmetric')
  parser.add_argument('--cache_dir', default='/tmp/deeplab_crf_search')
  args = parser.parse_args()
  start = time.time()
  ids = (VOC / 'ImageSets' / 'Segmentation' / 'train.txt').read_text().split()
  ids = ids[:args.max_images] if args.max_images else ids
  model, variables, config = load_model(Path(args.cache_dir))
  runner = Runner(model, variables, config, args.normalization)
  default = crf.CRFParams.RESNET101_V2
  print(f'{len(ids)} VOC images, converted {MODEL.name}, OS{OUTPUT_STRIDE}, 513 padding, one scale; CRF '
        f'normalization={args.normalization}; load average {os.getloadavg()[0]:.1f}', flush=True)

  search = [load(image_id) for image_id in ids[:args.num_search_images]]
  search_probabilities = [runner.probabilities(image) for image, _ in search]
  baseline = sum(confusion(label, probs.argmax(-1))
                 for (_, label), probs in zip(search, search_probabilities))
  print(f'\nGrid on the first {len(search)} images (w2={default.w2}, theta_gamma={default.theta_gamma}, '
        f'{default.num_iterations} iterations); no CRF: {100 * metrics.mean_iou(baseline):.2f}%')
  print(f'{"w1":>5s} {"theta_alpha":>11s} {"theta_beta":>10s} {"mIoU %":>7s} {"vs no CRF":>9s}')
  results = []
  for w1, theta_alpha, theta_beta in itertools.product(args.w1, args.theta_alpha, args.theta_beta):
    params = dataclasses.replace(default, w1=w1, theta_alpha=theta_alpha, theta_beta=theta_beta)
    total = sum(confusion(label, runner.crf_labels(probs, image, params))
                for (image, label), probs in zip(search, search_probabilities))
    miou = metrics.mean_iou(total)
    results.append((miou, params))
    print(f'{w1:5.1f} {theta_alpha:11.1f} {theta_beta:10.1f} {100 * miou:7.2f} '
          f'{100 * (miou - metrics.mean_iou(baseline)):+9.2f}', flush=True)
  best = max(results, key=lambda result: result[0])[1]
  print(f'best on the search images: w1={best.w1}, theta_alpha={best.theta_alpha}, '
        f'theta_beta={best.theta_beta} ({time.time() - start:.0f} s so far)', flush=True)

  settings = {'no CRF': None, 'CRF, DeepLab-v2 defaults': default, 'CRF, best of the grid': best}
  totals = {name: np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64) for name in settings}
  for index, image_id in enumerate(ids):
    image, label = load(image_id)
    probabilities = runner.probabilities(image)
    for name, params in settings.items():
      if params is None:
        prediction = probabilities.argmax(-1)
      else:
        prediction = runner.crf_labels(probabilities, image, params)
      totals[name] += confusion(label, prediction)
    if (index + 1) % 50 == 0:
      print(f'  {index + 1}/{len(ids)} images ({time.time() - start:.0f} s)', flush=True)
  print(f'\nmIoU on all {len(ids)} images (21 classes, void ignored):')
  for name, total in totals.items():
    print(f'  {name:26s} {100 * metrics.mean_iou(total):6.2f}%  (pixel accuracy '
          f'{100 * metrics.pixel_accuracy(total):.2f}%)')
  print(f'best = w1={best.w1}, theta_alpha={best.theta_alpha}, theta_beta={best.theta_beta}; '
        f'{time.time() - start:.0f} s in all; load average {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  main()
