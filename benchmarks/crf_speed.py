"""Dense CRF speed and agreement: `deeplab_jax.crf.dense_crf` vs pydensecrf2 on real VOC images.

  python benchmarks/crf_speed.py [--num_images=5] [--size=513] [--repeats=3] [--params=v2]

Each image of `../shared/data/voc2012_train_subset` (the first `num_images` ids) is resized to
`size x size` (bilinear; its mask nearest). The unaries come from its ground truth made uncertain the way a
network's are: one-hot logits (weight 3, void as background) plus Gaussian noise (std 2), smoothed with a
7x7 box, softmax; 21 classes. Both implementations get the same probabilities (pydensecrf through
`unary_from_softmax`, clip 1e-5, as ours), the same uint8 image and the same parameters
(`addPairwiseGaussian(sxy=theta_gamma, compat=w2)`, `addPairwiseBilateral(sxy=theta_alpha, srgb=theta_beta,
compat=w1)`, NORMALIZE_SYMMETRIC), 10 iterations.

Prints per image: our time (median of `repeats`, jitted, after one compile), pydensecrf's (set-up plus
inference, median), the ratio, argmax agreement and the max abs difference of the marginals; then the
medians, the number of compilations of our function across all images (one per image size) and the load
average before and after (the machine is shared: compare the ratio, taken in the same conditions).
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deeplab_jax import crf  # noqa: E402

VOC = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'voc2012_train_subset'
PARAMS = {'v1': crf.CRFParams.VGG16_V1, 'v2': crf.CRFParams.RESNET101_V2}


def noisy_probabilities(label: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
  """`[H, W, K]` float32 softmax of smoothed noisy one-hot logits of `label` (255 counts as class 0)."""
  rng = np.random.default_rng(seed)
  label = np.where(label == 255, 0, label).astype(np.int64)
  noise = rng.normal(0, 2.0, label.shape + (num_classes,))
  logits = 3.0 * np.eye(num_classes, dtype=np.float32)[label] + noise
  kernel = np.ones(7, np.float32) / 7
  for axis in (0, 1):
    logits = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode='same'), axis, logits)
  logits -= logits.max(-1, keepdims=True)
  probabilities = np.exp(logits)
  return (probabilities / probabilities.sum(-1, keepdims=True)).astype(np.float32)


def load_voc(image_id: str, size: int) -> tuple[np.ndarray, np.ndarray]:
  image = Image.open(VOC / 'JPEGImages' / f'{image_id}.jpg').convert('RGB')
  image = image.resize((size, size), Image.BILINEAR)
  label = Image.open(VOC / 'SegmentationClass' / f'{image_id}.png').resize((size, size), Image.NEAREST)
  return np.array(image, np.uint8), np.array(label, np.uint8)


def pydensecrf_marginals(image: np.ndarray, probabilities: np.ndarray, params: crf.CRFParams) -> np.ndarray:
  """`[H, W, K]` marginals of pydensecrf2's `DenseCRF2D` with DeepLab's parameter mapping."""
  import pydensecrf.densecrf as dcrf  # pylint: disable=g-import-not-at-top
  from pydensecrf.utils import unary_from_softmax  # pylint: disable=g-import-not-at-top
  height, width, num_classes = probabilities.shape
  model = dcrf.DenseCRF2D(width, height, num_classes)
  model.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probabilities.transpose(2, 0, 1))))
  model.addPairwiseGaussian(sxy=params.theta_gamma, compat=params.w2)
  model.addPairwiseBilateral(sxy=params.theta_alpha, srgb=params.theta_beta,
                             rgbim=np.ascontiguousarray(image), compat=params.w1)
  marginals = np.array(model.inference(params.num_iterations), np.float32)
  return marginals.reshape(num_classes, height, width).transpose(1, 2, 0)


def timed(fn, repeats: int):
  times, result = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), result


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--num_images', type=int, default=5)
  parser.add_argument('--size', type=int, default=513)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--params', choices=sorted(PARAMS), default='v2')
  parser.add_argument('--num_classes', type=int, default=21)
  args = parser.parse_args()
  params = PARAMS[args.params]
  ids = (VOC / 'ImageSets' / 'Segmentation' / 'train.txt').read_text().split()[:args.num_images]
  print(f'jax {jax.__version__}, backend {jax.default_backend()}; {params}; {args.size}x{args.size}x'
        f'{args.num_classes}; load average before {os.getloadavg()[0]:.2f}')
  ours = jax.jit(lambda probabilities, image: crf.dense_crf(probabilities[None], image[None], params)[0])
  print(f'{"image":16s} {"ours s":>8s} {"pydensecrf s":>13s} {"ratio":>6s} {"agree %":>8s} {"max|dQ|":>8s}')
  rows = []
  for index, image_id in enumerate(ids):
    image, label = load_voc(image_id, args.size)
    probabilities = noisy_probabilities(label, args.num_classes, seed=index)
    inputs = (jnp.asarray(probabilities), jnp.asarray(image))
    if index == 0:
      start = time.perf_counter()
      jax.block_until_ready(ours(*inputs))
      print(f'compile + first run: {time.perf_counter() - start:.1f} s')
    our_s, our_q = timed(lambda: np.asarray(jax.block_until_ready(ours(*inputs))), args.repeats)
    their_s, their_q = timed(lambda: pydensecrf_marginals(image, probabilities, params), args.repeats)
    agree = float(np.mean(our_q.argmax(-1) == their_q.argmax(-1)))
    rows.append((our_s, their_s, agree))
    print(f'{image_id:16s} {our_s:8.2f} {their_s:13.2f} {our_s / their_s:6.2f} {100 * agree:8.3f} '
          f'{np.abs(our_q - their_q).max():8.4f}', flush=True)
  ours_median, theirs_median = (statistics.median(r[i] for r in rows) for i in (0, 1))
  print(f'{"median":16s} {ours_median:8.2f} {theirs_median:13.2f} {ours_median / theirs_median:6.2f} '
        f'{100 * statistics.median(r[2] for r in rows):8.3f}')
  print(f'min agreement {100 * min(r[2] for r in rows):.3f}%; compilations of ours: {ours._cache_size()}; '
        f'load average after {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
  main()
