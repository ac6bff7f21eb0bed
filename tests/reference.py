"""The official TF DeepLab reference data (../shared/data/official_tf_reference), shared by the tests.

Each folder holds every variable of an official graph (names and shapes; values regenerated from the name
by `value_rule.py`), an input image and the graph's outputs. `official_outputs(case, impl)` runs our model on
the reference variables once per (case, depthwise implementation) and caches the result, so each full graph
is compiled once per test session whichever test asks for it.
"""
import functools
import importlib.util
import pathlib

import jax
import numpy as np

from configs import default
from deeplab_jax.convert import tf_names
from deeplab_jax.models import create_model

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
REFERENCE = SHARED_DATA / 'official_tf_reference'

# config.model overrides of each reference folder.
CASES = {
    'xception_65': dict(backbone='xception_65'),
    'xception_65_128': dict(backbone='xception_65'),
    'xception_65_os8': dict(backbone='xception_65', output_stride=8, atrous_rates=(12, 24, 36)),
    'mobilenet_v2': dict(backbone='mobilenet_v2', atrous_rates=(), decoder_output_stride=0,
                         aspp_with_separable_conv=False),
    'mobilenet_v2_128': dict(backbone='mobilenet_v2', atrous_rates=(), decoder_output_stride=0,
                             aspp_with_separable_conv=False),
    'resnet_v1_101_beta': dict(backbone='resnet_v1_101_beta', multi_grid=(1, 2, 4)),
}
# Folders whose variables are identical: one variable set (and one TF checkpoint) serves each group.
VARIABLE_SET = {'xception_65': 'xception_65', 'xception_65_128': 'xception_65',
                'xception_65_os8': 'xception_65', 'mobilenet_v2': 'mobilenet_v2',
                'mobilenet_v2_128': 'mobilenet_v2', 'resnet_v1_101_beta': 'resnet_v1_101_beta'}


def model_config(case: str, depthwise_impl: str = 'grouped'):
  m = default.get_model_config()
  m.depthwise_impl = depthwise_impl
  for key, value in CASES[case].items():
    m[key] = value
  return m


@functools.lru_cache(maxsize=None)
def value_rule():
  spec = importlib.util.spec_from_file_location('value_rule', REFERENCE / 'value_rule.py')
  rule = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(rule)
  return rule


def variable_list(case: str) -> list:
  """[(TF name, shape)] of the official graph of `case`."""
  rows = [line.split('\t') for line in (REFERENCE / case / 'variables.tsv').read_text().splitlines()[1:]]
  return [(name, tuple(int(d) for d in shape.split(','))) for name, shape, _ in rows]


@functools.lru_cache(maxsize=None)
def tf_arrays(variable_set: str) -> dict:
  """{TF name: array} of an official variable set, regenerated with the value rule (cached)."""
  rule = value_rule()
  return {name: rule.value_for(name, list(shape)) for name, shape in variable_list(variable_set)}


def reference_variables(case: str):
  """Our `{'params', 'batch_stats'}` holding the official variables of `case`."""
  model = create_model(model_config(case))
  images = np.load(REFERENCE / case / 'input.npy')
  target = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  variables, report = tf_names.assign_tf_arrays(tf_arrays(VARIABLE_SET[case]), target)
  assert len(report['loaded']) == len(variable_list(case))
  return variables


@functools.lru_cache(maxsize=None)
def official_outputs(case: str, depthwise_impl: str) -> dict:
  """Our outputs on the reference variables: backbone/aspp/decoder_tap intermediates, small and full logits."""
  model = create_model(model_config(case, depthwise_impl))
  images = np.load(REFERENCE / case / 'input.npy')

  @jax.jit
  def forward(variables, x):
    logits, state = model.apply(variables, x, mutable=['intermediates'])
    small = model.apply(variables, x, upsample=False)
    return dict({k: v[0] for k, v in state['intermediates'].items()}, logits=logits, logits_small=small)

  return jax.device_get(forward(reference_variables(case), images))


def assert_close(ours, theirs, name, rtol=1e-4):
  """Max abs error within `rtol` of the reference's largest magnitude."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
  err, scale = np.max(np.abs(ours - theirs)), np.max(np.abs(theirs))
  assert err <= rtol * scale, f'{name}: max abs err {err:.3g} vs scale {scale:.3g}'


def assert_matches_official(case: str, outputs: dict) -> None:
  """Every stored tensor of the official graph of `case` against ours."""
  folder = REFERENCE / case
  size = np.load(folder / 'input.npy').shape[1]
  assert_close(outputs['backbone_features'], np.load(folder / 'backbone_features.npy'), 'backbone')
  assert_close(outputs['aspp_projection'], np.load(folder / 'aspp_concat_projection.npy'), 'aspp')
  if (folder / 'decoder_tap.npy').exists():
    assert_close(outputs['decoder_tap'], np.load(folder / 'decoder_tap.npy'), 'decoder_tap')
  assert_close(outputs['logits_small'], np.load(folder / 'logits.npy'), 'logits')
  assert_close(outputs['logits'], np.load(folder / f'logits_{size}.npy'), f'logits_{size}')
