"""Our models against the official TF DeepLab graph itself (../shared/data/official_tf_reference).

Every variable of the official graph is regenerated from its name by the data's value rule, mapped into our
variables by the TF-name map, and our forward pass must reproduce the official backbone features, decoder
tap, ASPP projection and logits (before and after the final upsampling) to 1e-4 relative. The 128x128
folders pin the explicit padding of strided convs, the OS8 folder the dilated middle flow.
"""
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from deeplab_jax.convert import tf_names
from deeplab_jax.models import create_model

CASES = {
    'xception_65': dict(backbone='xception_65'),
    'xception_65_128': dict(backbone='xception_65'),
    'xception_65_os8': dict(backbone='xception_65', output_stride=8, atrous_rates=(12, 24, 36)),
    'mobilenet_v2': dict(backbone='mobilenet_v2', atrous_rates=(), decoder_output_stride=0),
    'mobilenet_v2_128': dict(backbone='mobilenet_v2', atrous_rates=(), decoder_output_stride=0),
    'resnet_v1_101_beta': dict(backbone='resnet_v1_101_beta', multi_grid=(1, 2, 4)),
}


def load_reference(folder):
  """{name: array} of the official variables, regenerated with the folder's value rule."""
  spec = importlib.util.spec_from_file_location('value_rule', folder.parent / 'value_rule.py')
  rule = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(rule)
  arrays = {}
  for line in (folder / 'variables.tsv').read_text().splitlines()[1:]:
    name, shape, _ = line.split('\t')
    arrays[name] = rule.value_for(name, [int(d) for d in shape.split(',')])
  return arrays


def model_config(depthwise_impl='grouped', **overrides):
  m = default.get_model_config()
  m.depthwise_impl = depthwise_impl
  for k, v in overrides.items():
    setattr(m, k, v)
  return m


def assert_close(ours, theirs, name, rtol=1e-4):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
  scale = np.max(np.abs(theirs))
  err = np.max(np.abs(ours - theirs))
  assert err <= rtol * scale, f'{name}: max abs err {err:.3g} vs scale {scale:.3g}'


# The CPU 'shifted' depthwise formulation must match too, on the even sizes where padding is tricky.
PARAMS = [(case, 'grouped') for case in sorted(CASES)] + [
    ('xception_65_128', 'shifted'), ('mobilenet_v2_128', 'shifted'), ('xception_65_os8', 'shifted')]


@pytest.mark.parametrize('case,impl', PARAMS)
def test_matches_official_graph(case, impl, shared_data):
  folder = shared_data / 'official_tf_reference' / case
  meta = json.loads((folder / 'meta.json').read_text())
  model = create_model(model_config(impl, **CASES[case]))
  images = np.load(folder / 'input.npy')
  target = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.asarray(images))
  variables, report = tf_names.assign_tf_arrays(load_reference(folder), target)
  assert len(report['loaded']) == len((folder / 'variables.tsv').read_text().splitlines()) - 1
  logits, state = jax.jit(lambda v, x: model.apply(v, x, mutable=['intermediates']))(
      variables, images)
  inter = {k: v[0] for k, v in state['intermediates'].items()}
  size = images.shape[1]
  assert_close(inter['backbone_features'], np.load(folder / 'backbone_features.npy'), 'backbone')
  assert_close(inter['aspp_projection'], np.load(folder / 'aspp_concat_projection.npy'), 'aspp')
  if (folder / 'decoder_tap.npy').exists():
    assert_close(inter['decoder_tap'], np.load(folder / 'decoder_tap.npy'), 'decoder_tap')
  assert_close(inter['logits_small'], np.load(folder / 'logits.npy'), 'logits')
  assert_close(logits, np.load(folder / f'logits_{size}.npy'), f'logits_{size}')
  assert meta['model_options']['output_stride'] == model.output_stride
