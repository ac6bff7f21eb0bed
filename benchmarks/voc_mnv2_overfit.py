"""Training-loss curve of DeepLabV3 MobileNetV2 on the 330 real VOC 2012 images in ../shared/data.

A sanity benchmark for the trainer on real data (no pretrained weights): the official VOC recipe
(`configs/voc_mobilenetv2.py`: SGD momentum 0.9, poly schedule, weight decay 4e-5, random scale 0.5..2,
crop, flip, 255 ignored) from random initialisation, for a few hundred steps; the pixel loss must fall.
It then evaluates on 30 of the training images (an overfitting check, not a val figure).

  python benchmarks/voc_mnv2_overfit.py [--steps=300] [--crop=321] [--batch=8] [--depth_multiplier=0.5]

Prints one line per `--log_every` steps: step, mean pixel loss over the interval, learning rate, images/s.
"""
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import voc_mobilenetv2  # pylint: disable=g-import-not-at-top
from deeplab_jax import evaluate
from deeplab_jax import input_pipeline
from deeplab_jax import optim
from deeplab_jax import train
from deeplab_jax.models import create_model

SUBSET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir, 'shared', 'data',
                      'voc2012_train_subset')
flags.DEFINE_integer('steps', 300, 'Training steps.')
flags.DEFINE_integer('crop', 321, 'Square training crop (16k+1).')
flags.DEFINE_integer('batch', 8, 'Global batch size.')
flags.DEFINE_float('depth_multiplier', 0.5, 'MobileNetV2 width.')
flags.DEFINE_float('learning_rate', 0.007, 'Base learning rate (official 0.007).')
flags.DEFINE_integer('log_every', 25, 'Steps per printed point of the curve.')
flags.DEFINE_string('subset', SUBSET, 'The VOC subset folder (JPEGImages/, SegmentationClass/, ImageSets/).')
FLAGS = flags.FLAGS


def make_devkit(root: str, subset: str) -> str:
  """A VOCdevkit/VOC2012 view of the subset: train = its 330 ids, val = 30 of them (overfitting check)."""
  voc = os.path.join(root, 'VOCdevkit', 'VOC2012')
  os.makedirs(os.path.join(voc, 'ImageSets', 'Segmentation'))
  for folder in ('JPEGImages', 'SegmentationClass'):
    os.symlink(os.path.abspath(os.path.join(subset, folder)), os.path.join(voc, folder))
  with open(os.path.join(subset, 'ImageSets', 'Segmentation', 'train.txt')) as f:
    ids = [line.strip() for line in f if line.strip()]
  with open(os.path.join(voc, 'ImageSets', 'Segmentation', 'train.txt'), 'w') as f:
    f.write('\n'.join(ids) + '\n')
  with open(os.path.join(voc, 'ImageSets', 'Segmentation', 'val.txt'), 'w') as f:
    f.write('\n'.join(ids[:30]) + '\n')
  return root


def main(argv):
  del argv
  workdir = tempfile.mkdtemp(prefix='voc_mnv2_')
  config = voc_mobilenetv2.get_config(str(FLAGS.depth_multiplier))
  d, t = config.dataset, config.train
  d.builder_config, d.train_split, d.eval_split = 'voc_only', 'train', 'val'
  d.manual_dir = make_devkit(os.path.join(workdir, 'manual'), FLAGS.subset)
  d.data_dir = os.path.join(workdir, 'tfds')
  t.batch_size, t.crop_size, t.num_steps = FLAGS.batch, (FLAGS.crop, FLAGS.crop), FLAGS.steps
  t.base_learning_rate = FLAGS.learning_rate
  config.eval.batch_size = jax.device_count()
  dataset = input_pipeline.load_dataset(config)
  info = dataset.info
  print(f'{info.num_train_examples} train images, MobileNetV2 x{FLAGS.depth_multiplier}, crop {FLAGS.crop}, '
        f'batch {FLAGS.batch}, {jax.device_count()} {jax.devices()[0].platform} device(s)', flush=True)

  mesh = train.create_mesh()
  model = create_model(config.model)
  tx, schedule = optim.create_optimizer(t)
  state = train.create_train_state(config, model, tx, mesh)
  step_fn = train.make_train_step(config, model, tx, schedule, mesh)
  batches = input_pipeline.create_train_iterator(config, dataset)
  losses, start = [], time.time()
  print('step  loss    lr       images/s', flush=True)
  for step in range(1, t.num_steps + 1):
    state, metrics = step_fn(state, input_pipeline.shard_batch(next(batches), mesh))
    losses.append(metrics['loss'])
    if step % FLAGS.log_every == 0 or step == 1:
      mean_loss = float(np.mean(jax.device_get(losses)))
      seconds, start = time.time() - start, time.time()
      print(f'{step:4d}  {mean_loss:.4f}  {float(metrics["learning_rate"]):.5f}  '
            f'{len(losses) * t.batch_size / seconds:7.1f}', flush=True)
      losses = []
  summary, _ = evaluate.Evaluator(config, mesh, dataset).run(state.variables())
  print(f'mIoU on 30 training images: {summary["miou"]:.4f}, pixel accuracy {summary["pixel_accuracy"]:.4f}')


if __name__ == '__main__':
  app.run(main)
