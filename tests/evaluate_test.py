"""Tests for deeplab_jax.evaluate: multi-scale/flip inference and a hand-checked eval on real VOC files."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import tiny
from deeplab_jax import checkpoint
from deeplab_jax import evaluate
from deeplab_jax import input_pipeline
from deeplab_jax import train
from deeplab_jax.models import create_model
from deeplab_jax.models import layers

VAL_IDS = ('2007_008043', '2007_001724', '2007_002273')  # the three smallest images of the subset
TRAIN_IDS = ('2007_008468',)


def _tiny_model_and_variables(num_classes=5):
  config = tiny.get_config()
  config.model.depthwise_impl = 'grouped'
  config.model.num_classes = num_classes
  model = create_model(config.model)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 33, 33, 3)), train=False)
  return config, model, variables


def test_multi_scale_and_flip_average_softmax():
  config, model, variables = _tiny_model_and_variables()
  images = jax.random.uniform(jax.random.key(1), (2, 33, 33, 3), maxval=255.0)
  assert model.logits_stride == 4

  @jax.jit
  def compute(variables, images):
    single = evaluate.predict_probabilities(model, variables, images, (1.0,), False)
    direct = jax.nn.softmax(model.apply(variables, images, train=False), -1)
    flipped = evaluate.predict_probabilities(model, variables, images, (1.0,), True)
    mirror = jax.nn.softmax(model.apply(variables, images[:, :, ::-1], train=False), -1)[:, :, ::-1]
    multi = evaluate.predict_probabilities(model, variables, images, (0.5, 1.0), False)
    half = layers.resize_bilinear(images, (17, 17))
    small = model.apply(variables, half, train=False, upsample=False)  # 5x5 at stride 4
    # Official: merged logits at scale_dimension(33, 1/4) = 9, then the image size.
    half_probs = jax.nn.softmax(layers.resize_bilinear(layers.resize_bilinear(small, (9, 9)), (33, 33)), -1)
    return single, direct, flipped, mirror, multi, half_probs

  single, direct, flipped, mirror, multi, half_probs = compute(variables, images)
  # Scale 1.0: the model's own output (the same two resizes collapse to one).
  np.testing.assert_allclose(single, direct, atol=1e-5)
  np.testing.assert_allclose(flipped, (direct + mirror) / 2, atol=1e-5)
  np.testing.assert_allclose(multi, (half_probs + direct) / 2, atol=1e-5)
  np.testing.assert_allclose(np.sum(np.asarray(multi), -1), 1.0, atol=1e-5)


def _voc_folder(root, shared_data):
  """A VOCdevkit/VOC2012 folder with 3 real val and 1 real train image."""
  source = shared_data / 'voc2012_train_subset'
  voc = root / 'VOCdevkit' / 'VOC2012'
  for sub in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'):
    os.makedirs(voc / sub)
  for image_id in VAL_IDS + TRAIN_IDS:
    shutil.copy(source / 'JPEGImages' / f'{image_id}.jpg', voc / 'JPEGImages')
    shutil.copy(source / 'SegmentationClass' / f'{image_id}.png', voc / 'SegmentationClass')
  (voc / 'ImageSets/Segmentation/val.txt').write_text('\n'.join(VAL_IDS) + '\n')
  (voc / 'ImageSets/Segmentation/train.txt').write_text('\n'.join(TRAIN_IDS) + '\n')
  return voc


def voc_eval_setup(tmp_path, shared_data, predicted_class=0):
  """A tiny 21-class model that predicts `predicted_class` everywhere, checkpointed in a workdir."""
  _voc_folder(tmp_path / 'manual', shared_data)
  config, model, variables = _tiny_model_and_variables(num_classes=21)
  d = config.dataset
  d.name, d.builder_config, d.eval_split, d.train_split = 'voc2012_segmentation', 'voc_only', 'val', 'train'
  d.num_classes, d.manual_dir, d.data_dir = 21, str(tmp_path / 'manual'), str(tmp_path / 'tfds')
  d.num_workers = 0
  config.eval.crop_size = (321, 321)
  config.eval.num_images_to_save = 3
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 0 if 'logits' in jax.tree_util.keystr(path) else x, variables['params'])
  logits_scope = next(k for k in params if k.startswith('logits'))
  params[logits_scope] = dict(params[logits_scope])
  if 'semantic' in params[logits_scope]:
    params[logits_scope]['semantic'] = dict(params[logits_scope]['semantic'])
    params[logits_scope]['semantic']['bias'] = jnp.zeros(21).at[predicted_class].set(10.0)
  else:
    params[logits_scope]['bias'] = jnp.zeros(21).at[predicted_class].set(10.0)
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'run'), async_save=False)
  ckpt.save(12, {'params': params, 'batch_stats': variables['batch_stats']},
            {'step': jnp.int32(12), 'opt_state': {}}, config)
  ckpt.close()
  return config


def expected_confusion(shared_data, predicted_class=0):
  """Hand count: every labelled pixel (label < 21, 255 excluded) lands in column `predicted_class`."""
  confusion = np.zeros((21, 21), np.int64)
  for image_id in VAL_IDS:
    mask = np.asarray(Image.open(shared_data / 'voc2012_train_subset' / 'SegmentationClass' / f'{image_id}.png'))
    counts = np.bincount(mask[mask != 255].ravel(), minlength=21)
    confusion[:, predicted_class] += counts
  return confusion


def test_eval_on_voc_folder_matches_hand_count(tmp_path, shared_data, capsys):
  config = voc_eval_setup(tmp_path, shared_data)
  summary = evaluate.evaluate(config, str(tmp_path / 'run'), train.create_mesh())
  expected = expected_confusion(shared_data)
  # Padding (to 321x321 and 5 padding examples in the batch of 8) and label 255 never count.
  np.testing.assert_array_equal(np.asarray(summary['confusion']), expected)
  total, background = expected.sum(), expected[0, 0]
  present = np.count_nonzero(expected.sum(axis=1))
  assert present >= 2
  np.testing.assert_allclose(summary['miou'], background / total / present)
  np.testing.assert_allclose(summary['pixel_accuracy'], background / total)
  assert summary['num_images'] == 3
  out = capsys.readouterr().out
  assert 'Evaluation of step 12' in out and 'aeroplane' in out and 'mIoU' in out and 'pixel accuracy' in out
  assert f'{100 * background / total / present:7.2f}' in out
  panels = os.listdir(tmp_path / 'run' / 'predictions' / 'eval_step_0000012')
  assert sorted(panels) == ['00.png', '01.png', '02.png']
  assert os.path.exists(tmp_path / 'run' / 'eval' / 'step_0000012.json')


def test_eval_without_checkpoint_names_the_problem(tmp_path):
  config, _, _ = _tiny_model_and_variables()
  config.dataset.data_dir = str(tmp_path / 'tfds')
  config.dataset.synthetic_image_size, config.dataset.synthetic_num_train = 33, 8
  config.dataset.synthetic_num_val, config.dataset.num_workers = 8, 0
  config.dataset.train_split, config.dataset.eval_split = 'train', 'val'
  with pytest.raises(checkpoint.CheckpointError, match='Nothing to evaluate: no checkpoint in .*empty_run'):
    evaluate.evaluate(config, str(tmp_path / 'empty_run'), train.create_mesh())


@pytest.mark.parametrize('field,value,match', [
    ('output_stride', 12, r'config.eval.output_stride=12 is not one of \(8, 16, 32\)'),
    ('scales', (), r'config.eval.scales=\(\) must be a non-empty list'),
    ('batch_size', 4, r'config.eval.batch_size=4 must be a multiple of the number of devices \(8\)'),
])
def test_bad_eval_config_names_the_field(tmp_path, field, value, match):
  config, _, _ = _tiny_model_and_variables()
  config.dataset.data_dir = str(tmp_path / 'tfds')
  config.dataset.synthetic_image_size, config.dataset.synthetic_num_train = 33, 8
  config.dataset.synthetic_num_val, config.dataset.num_workers = 8, 0
  config.dataset.train_split, config.dataset.eval_split = 'train', 'val'
  config.eval[field] = value
  with pytest.raises(ValueError, match=match):
    evaluate.Evaluator(config, train.create_mesh(), input_pipeline.load_dataset(config))
