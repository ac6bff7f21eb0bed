"""`deeplab_jax.predict` against `--mode=eval` on real VOC images: the same mIoU from the written label PNGs.

  python benchmarks/predict_voc.py [--model=../shared/data/official_tflite/deeplabv3_mnv2_pascal_quant.tflite]
      [--voc_dir=../shared/data/voc2012_train_subset] [--work_dir=/tmp/predict_voc] [--batch_size=4]

1. Converts the official 8-bit MobileNetV2 TFLite model (`convert.convert_and_save`, graph meaning).
2. `predict.predict_files` over every image of `train.txt` (330): label PNGs, overlays; then the mIoU of the
   label PNGs against `SegmentationClass/` (21 classes, 255 not counted).
3. `evaluate.evaluate` (`--mode=eval`: VOC builder, 513 mean-pixel padding, OS16, one scale, no flip) on the
   same images, with `config.init_from` = the converted model.
Prints both mIoUs, their difference, the number of pixels whose labels differ, and images/s of each.
"""
import os
import pathlib
import shutil
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import voc_mobilenetv2  # noqa: E402
from deeplab_jax import convert
from deeplab_jax import evaluate
from deeplab_jax import metrics
from deeplab_jax import predict
from deeplab_jax import train
from deeplab_jax import visualize
from voc_subset import voc_manual_dir

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared' / 'data'
FLAGS = flags.FLAGS
flags.DEFINE_string('model', str(SHARED / 'official_tflite' / 'deeplabv3_mnv2_pascal_quant.tflite'),
                    'Official DeepLab MobileNetV2 .tflite (x1.0).')
flags.DEFINE_string('voc_dir', str(SHARED / 'voc2012_train_subset'), 'VOC2012-layout folder with train.txt.')
flags.DEFINE_string('work_dir', '', 'Scratch directory (default: a new temporary one, kept, printed).')
flags.DEFINE_integer('batch_size', 4, 'Prediction batch size.')


def confusion_of_pngs(label_dir: pathlib.Path, truth_dir: pathlib.Path, ids: list) -> np.ndarray:
  confusion = np.zeros((21, 21), np.int64)
  for image_id in ids:
    truth = visualize.read_label_png(str(truth_dir / f'{image_id}.png')).astype(np.int64)
    predicted = visualize.read_label_png(str(label_dir / f'{image_id}.png')).astype(np.int64)
    valid = truth < 21
    confusion += np.bincount(truth[valid] * 21 + predicted[valid], minlength=21 * 21).reshape(21, 21)
  return confusion


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  voc = pathlib.Path(FLAGS.voc_dir)
  ids = (voc / 'ImageSets' / 'Segmentation' / 'train.txt').read_text().split()
  work = pathlib.Path(FLAGS.work_dir or tempfile.mkdtemp(prefix='predict_voc_'))
  converted = work / 'converted'
  if converted.exists():
    shutil.rmtree(converted)
  config = voc_mobilenetv2.get_config()
  convert.convert_and_save(FLAGS.model, config, str(converted))

  start = time.time()
  predictor = predict.Predictor.from_checkpoint(str(converted), batch_size=FLAGS.batch_size)
  summary = predict.predict_files(predictor, [str(voc / 'JPEGImages' / f'{i}.jpg') for i in ids],
                                  str(work / 'predictions'))
  predict_seconds = time.time() - start
  confusion = confusion_of_pngs(work / 'predictions' / 'labels', voc / 'SegmentationClass', ids)
  ours = metrics.mean_iou(confusion)
  print(f'predict: {len(summary["images"])} label PNGs ({len(summary["skipped"])} skipped), '
        f'{predictor.num_compiles} compiled shape(s), {predict_seconds:.0f} s '
        f'({len(ids) / predict_seconds:.2f} images/s with PNG and overlay writing); '
        f'mIoU from the PNGs {100 * ours:.4f}%')

  config.dataset.builder_config = 'voc_only'
  config.dataset.manual_dir = str(voc_manual_dir(voc, work))
  config.dataset.data_dir = str(work / 'tfds')
  config.dataset.train_split, config.dataset.eval_split = 'train', 'val'
  config.eval.batch_size = jax.device_count() * 2
  config.eval.num_images_to_save = 0
  config.init_from = str(converted)
  start = time.time()
  eval_summary = evaluate.evaluate(config, str(work / 'eval_run'), train.create_mesh())
  eval_seconds = time.time() - start
  theirs = eval_summary['miou']
  differing = int(np.abs(confusion - np.asarray(eval_summary['confusion'])).sum()) // 2
  print(f'--mode=eval: {eval_summary["num_images"]} images, {eval_seconds:.0f} s; mIoU {100 * theirs:.4f}%')
  print(f'predict minus eval: {100 * (ours - theirs):+.6f} points; confusion matrices differ in at most '
        f'{differing} of {confusion.sum()} pixels')
  print(f'outputs in {work}')


if __name__ == '__main__':
  os.chdir(REPO)
  app.run(main)
