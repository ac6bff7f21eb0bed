"""The TF-checkpoint importer against the official TF DeepLab graph (../shared/data/official_tf_reference).

Each test writes a real TF checkpoint (TensorFlow `SaveV2`, keys = the official variable names of
`variables.tsv`, values from the data's `value_rule.py`), converts it with the project's importer, runs our
model and matches every stored array of the official graph to 1e-4 relative. Every variable of each list
must be consumed. The 128x128 folders check the explicit padding of strided convs, the OS8 folder the
dilated middle flow. The wrong-pairing tests check the error lists the offending names and shapes.
"""
import json
import pathlib
import re

import flax
import jax
import numpy as np
import pytest

import reference
from configs import default
from deeplab_jax import checkpoint
from deeplab_jax import convert
from deeplab_jax.convert import common
from deeplab_jax.convert import tf_checkpoint
from deeplab_jax.models import create_model
import tensorflow as tf  # the `test` extra installs it (writes the checkpoints)

CASES = reference.CASES
assert_close = reference.assert_close


def write_tf_checkpoint(prefix: str, arrays: dict) -> str:
  """Writes a TF1-format checkpoint whose keys are exactly the given variable names."""
  names = sorted(arrays)
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[''] * len(names),
                    tensors=[tf.constant(arrays[n]) for n in names])
  return prefix


@pytest.fixture(scope='session')
def official_checkpoints(shared_data, tmp_path_factory):
  """{variable set: checkpoint prefix}, each written once per session from the value rule."""
  root = tmp_path_factory.mktemp('official_ckpt')
  prefixes = {}
  for name in sorted(set(reference.VARIABLE_SET.values())):
    arrays = dict(reference.tf_arrays(name))
    arrays['global_step'] = np.asarray(30000, np.int64)  # as in the model zoo checkpoints
    prefixes[name] = write_tf_checkpoint(str(root / name / 'model.ckpt-30000'), arrays)
  return prefixes


def make_config(**overrides):
  config = default.get_config()
  config.model.depthwise_impl = 'grouped'
  for key, value in overrides.items():
    setattr(config.model, key, value)
  return config


@pytest.mark.parametrize('case', sorted(CASES))
def test_official_checkpoint_reproduces_official_graph(case, shared_data, official_checkpoints):
  config = make_config(**CASES[case])
  variables, report = tf_checkpoint.convert_tf_checkpoint(
      official_checkpoints[reference.VARIABLE_SET[case]] + '.index', config)
  names = [name for name, _ in reference.variable_list(case)]
  assert sorted(report['loaded']) == sorted(names)  # every variable of the list consumed
  assert report['new'] == [] and report['scope'] == 'all'
  assert report['skipped'] == [('global_step', 'training state, not a weight')]
  # The converted variables are, array for array, those whose forward pass reproduces the official graph
  # (computed once per session and shared with official_reference_test).
  converted = flax.traverse_util.flatten_dict(variables, sep='/')
  expected = flax.traverse_util.flatten_dict(jax.device_get(reference.reference_variables(case)), sep='/')
  assert set(converted) == set(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(converted[name], value, err_msg=name)
  reference.assert_matches_official(case, reference.official_outputs(case, 'grouped'))
  meta = json.loads((shared_data / 'official_tf_reference' / case / 'meta.json').read_text())
  assert meta['model_options']['output_stride'] == create_model(config.model).output_stride


def test_saved_checkpoint_is_what_init_from_and_eval_read(shared_data, official_checkpoints, tmp_path):
  config = make_config(**CASES['mobilenet_v2'])
  out = tmp_path / 'converted'
  report = convert.convert_and_save(official_checkpoints['mobilenet_v2'], config, str(out))
  assert json.loads((out / common.REPORT_FILE).read_text())['loaded'] == report['loaded']
  model = create_model(config.model)
  images = np.load(shared_data / 'official_tf_reference' / 'mobilenet_v2' / 'input.npy')
  fresh = model.init(jax.random.PRNGKey(0), images)
  for scope, loaded in (('all', 272), ('backbone', 255)):
    variables, load_report = checkpoint.load_pretrained(str(out), fresh, scope, backbone_scope='MobilenetV2')
    assert len(load_report['loaded']) == loaded and load_report['new'] == []
  variables, _ = checkpoint.load_pretrained(str(out), fresh, 'all')
  assert_close(model.apply(variables, images),
               np.load(shared_data / 'official_tf_reference' / 'mobilenet_v2' / 'logits_129.npy'),
               'logits_129')
  with pytest.raises(convert.ConversionError, match='already holds checkpoints'):
    convert.convert_and_save(official_checkpoints['mobilenet_v2'], config, str(out))


def test_imagenet_backbone_checkpoint_loads_backbone_only(shared_data, tmp_path):
  """An ImageNet checkpoint: backbone + classifier; the classifier is skipped, the heads are left new."""
  arrays = {v: a for v, a in reference.tf_arrays('mobilenet_v2').items() if v.startswith('MobilenetV2/')}
  arrays['MobilenetV2/Logits/Conv2d_1c_1x1/weights'] = np.zeros((1, 1, 1280, 1001), np.float32)
  arrays['MobilenetV2/Conv_1/weights'] = np.zeros((1, 1, 320, 1280), np.float32)
  arrays['global_step'] = np.asarray(1, np.int64)
  prefix = write_tf_checkpoint(str(tmp_path / 'imagenet' / 'model.ckpt'), arrays)
  config = make_config(**CASES['mobilenet_v2'])
  variables, report = tf_checkpoint.convert_tf_checkpoint(str(tmp_path / 'imagenet'), config)
  assert report['scope'] == 'backbone' and len(report['loaded']) == len(arrays) - 3
  assert {n for n, _ in report['skipped']} == {
      'MobilenetV2/Logits/Conv2d_1c_1x1/weights', 'MobilenetV2/Conv_1/weights', 'global_step'}
  assert set(variables['params']) == {'MobilenetV2'} and len(report['new']) == 17
  assert all(path.split(':')[1].startswith(('aspp/', 'logits/')) for path in report['new'])
  with pytest.raises(convert.ConversionError, match=r'17 model variables are missing'):
    tf_checkpoint.convert_tf_checkpoint(prefix, config, scope='all')


@pytest.mark.parametrize('source,overrides,expected', [
    # An Xception checkpoint for a MobileNetV2 config: the backbone names are foreign (715 of 732), the
    # shared head names have other shapes, and every MobileNetV2 variable is missing.
    ('xception_65', CASES['mobilenet_v2'], [
        r'715 checkpoint variables have no place in this model \(by top scope: xception_65: \d+, ',
        r'aspp1_depthwise/depthwise_weights', r'shapes disagree',
        r'aspp0/weights: checkpoint \(1, 1, 2048, 256\) -> ours aspp/aspp0/kernel \(1, 1, 320, 256\)',
        r'255 model variables are missing from the checkpoint \(by top scope: MobilenetV2: 255\)',
        r'params:MobilenetV2/Conv/kernel']),
    # MobileNetV2 1.0 weights for the 0.5 config: same names, other shapes, each listed with both shapes.
    ('mobilenet_v2', dict(CASES['mobilenet_v2'], depth_multiplier=0.5), [
        r'shapes disagree with the config',
        r'MobilenetV2/Conv/weights: checkpoint \(3, 3, 3, 32\) -> ours MobilenetV2/Conv/kernel '
        r'\(3, 3, 3, 16\)']),
    # ResNet-101-beta for a plain ResNet-101 (7x7 stem) config.
    ('resnet_v1_101_beta', dict(CASES['resnet_v1_101_beta'], backbone='resnet_v1_101'), [
        r'resnet_v1_101/conv1_1/weights', r'params:resnet_v1_101/conv1/kernel']),
])
def test_wrong_pairing_lists_names_and_shapes(source, overrides, expected, official_checkpoints):
  with pytest.raises(convert.ConversionError) as error:
    tf_checkpoint.convert_tf_checkpoint(official_checkpoints[source], make_config(**overrides))
  for pattern in expected:
    assert re.search(pattern, str(error.value)), (pattern, str(error.value)[:2000])


def test_checkpoint_prefix_forms(official_checkpoints, tmp_path):
  prefix = official_checkpoints['mobilenet_v2']
  folder = str(pathlib.Path(prefix).parent)
  for form in (prefix, prefix + '.index', prefix + '.data-00000-of-00001', folder):
    assert tf_checkpoint.checkpoint_prefix(form) == prefix
  with pytest.raises(convert.ConversionError, match='No TF checkpoint'):
    tf_checkpoint.checkpoint_prefix(str(tmp_path / 'model.ckpt-1'))
