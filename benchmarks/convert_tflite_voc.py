"""mIoU of a converted official DeepLab TFLite model vs the official runtime, on the same VOC images.

  python benchmarks/convert_tflite_voc.py \
      [--model=../shared/data/official_tflite/deeplabv3_mnv2_pascal_quant.tflite --depth_multiplier=1.0]
      [--voc_dir=../shared/data/voc2012_train_subset] [--work_dir=/tmp/convert_tflite_voc]

1. The official runtime (`ai-edge-litert`, uint8 kernels) on every image of `train.txt`, padded top-left to
   513x513 with pixel 128 (real 0.0, the mean pixel; labels padded with 255), argmax compared with the label.
2. The same file converted as `python -m deeplab_jax.convert` does and evaluated by our standard eval
   (`deeplab_jax.evaluate.evaluate`: VOC dataset builder, 513 mean-pixel padding, OS16, one scale, no flip)
   with `config.init_from` = the converted checkpoint: once with the graph's meaning (default), once with
   `--match_tflite_runtime` (the runtime's requantization-free uint8 resize of the image-pooling branch).
Each prints mIoU over the 21 classes (tf.metrics.mean_iou convention) and the difference to the runtime.
"""
import os
import pathlib
import shutil
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
from PIL import Image

from ai_edge_litert.interpreter import Interpreter
from ai_edge_litert.interpreter import OpResolverType
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import voc_mobilenetv2  # noqa: E402
from deeplab_jax import convert
from deeplab_jax import evaluate
from deeplab_jax import metrics
from deeplab_jax import train
from voc_subset import voc_manual_dir

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared' / 'data'
FLAGS = flags.FLAGS
flags.DEFINE_string('model', str(SHARED / 'official_tflite' / 'deeplabv3_mnv2_pascal_quant.tflite'),
                    'Official DeepLab MobileNetV2 .tflite (513x513 uint8 input, argmax output).')
flags.DEFINE_string('depth_multiplier', '1.0', 'Depth multiplier of that model (configs/voc_mobilenetv2.py).')
flags.DEFINE_string('voc_dir', str(SHARED / 'voc2012_train_subset'), 'VOC2012-layout folder with train.txt.')
flags.DEFINE_string('work_dir', '', 'Scratch directory (default: a new temporary one, removed at the end).')
CROP = 513


def official_runtime_miou(model_path: str, voc: pathlib.Path, ids: list) -> float:
  interpreter = Interpreter(model_path=model_path,
                            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
  interpreter.allocate_tensors()
  scale, zero_point = interpreter.get_input_details()[0]['quantization']
  assert abs(zero_point * scale - 1.0) < 1e-6, 'pad value 128 is real 0.0 only for this input quantization'
  confusion = np.zeros((21, 21), np.int64)
  for image_id in ids:
    image = np.asarray(Image.open(voc / 'JPEGImages' / f'{image_id}.jpg').convert('RGB'))
    label = np.asarray(Image.open(voc / 'SegmentationClass' / f'{image_id}.png'))
    padded = np.full((CROP, CROP, 3), zero_point, np.uint8)
    padded[:image.shape[0], :image.shape[1]] = image
    interpreter.set_tensor(interpreter.get_input_details()[0]['index'], padded[None])
    interpreter.invoke()
    prediction = interpreter.get_tensor(interpreter.get_output_details()[0]['index'])[0]
    prediction = prediction[:label.shape[0], :label.shape[1]]
    valid = label < 21
    confusion += np.bincount(label[valid].astype(np.int64) * 21 + prediction[valid],
                             minlength=21 * 21).reshape(21, 21)
  return metrics.mean_iou(confusion)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  voc = pathlib.Path(FLAGS.voc_dir)
  ids = (voc / 'ImageSets' / 'Segmentation' / 'train.txt').read_text().split()
  work = pathlib.Path(FLAGS.work_dir or tempfile.mkdtemp(prefix='convert_tflite_voc_'))
  theirs = official_runtime_miou(FLAGS.model, voc, ids)
  print(f'official runtime (uint8): mIoU {100 * theirs:.2f}% on {len(ids)} images')

  for match_runtime in (False, True):
    ours, count, report = our_eval_miou(voc, work, match_runtime)
    label = 'the runtime\'s resize (--match_tflite_runtime)' if match_runtime else 'the graph\'s meaning'
    print(f"converted ({report['format']}, graph OS{report['output_stride']}), {label}, in our standard "
          f'eval: mIoU {100 * ours:.2f}% on {count} images; minus official runtime: '
          f'{100 * (ours - theirs):+.2f} points')
  if not FLAGS.work_dir:
    shutil.rmtree(work)


def our_eval_miou(voc: pathlib.Path, work: pathlib.Path, match_runtime: bool):
  """Converts the model and runs `deeplab_jax.evaluate.evaluate` on the images: (mIoU, images, report)."""
  config = voc_mobilenetv2.get_config(FLAGS.depth_multiplier)
  converted = work / f'converted_match_runtime_{match_runtime}'
  if converted.exists():
    shutil.rmtree(converted)
  report = convert.convert_and_save(FLAGS.model, config, str(converted),
                                    match_tflite_runtime=match_runtime)
  config.dataset.builder_config = 'voc_only'
  config.dataset.manual_dir = str(voc_manual_dir(voc, work))
  config.dataset.data_dir = str(work / 'tfds')
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'val'
  config.eval.crop_size = (CROP, CROP)
  config.eval.output_stride = 16
  config.eval.scales = (1.0,)
  config.eval.flip = False
  config.eval.batch_size = jax.device_count() * 2
  config.eval.num_images_to_save = 0
  config.init_from = str(converted)
  summary = evaluate.evaluate(config, str(work / f'eval_run_{match_runtime}'), train.create_mesh())
  return summary['miou'], summary['num_images'], report


if __name__ == '__main__':
  os.chdir(REPO)
  app.run(main)
