"""Tests for deeplab_jax.flops: exact counts on hand-built modules, published DeepLab figures."""
import functools
import importlib
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from configs import voc_mobilenetv2
from deeplab_jax import flops


def _count(module: nn.Module, shape, **kwargs):
  """Traces `module` on an abstract float32 input of `shape` and counts it."""
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  variables = jax.eval_shape(module.init, jax.random.key(0), x)
  closed_jaxpr = jax.make_jaxpr(module.apply)(variables, x)
  return flops.count_jaxpr(closed_jaxpr, root=type(module).__name__, **kwargs)


class _Single(nn.Module):
  layer: nn.Module

  @nn.compact
  def __call__(self, x):
    return self.layer(x)  # A module attribute is bound as the child 'layer'.


@pytest.mark.parametrize('layer, shape, expected', [
    # 17x17x8 -> stride 2 SAME -> 9x9x16; 2 groups: each output sums 3*3*(8/2) products.
    (nn.Conv(16, (3, 3), strides=2, feature_group_count=2), (1, 17, 17, 8), 9 * 9 * 16 * 9 * 4),
    # Atrous: the dilation spreads the window but does not change the products per output.
    (nn.Conv(16, (3, 3), kernel_dilation=4), (1, 17, 17, 8), 17 * 17 * 16 * 9 * 8),
    # Depthwise: one 3x3 window per output channel.
    (nn.Conv(8, (3, 3), feature_group_count=8), (2, 17, 15, 8), 2 * 17 * 15 * 8 * 9),
    # VALID 1x5 kernel on a non-square input, batch 3.
    (nn.Conv(6, (1, 5), padding='VALID'), (3, 4, 9, 2), 3 * 4 * 5 * 6 * 5 * 2),
    # Dense over the last axis of a [2, 5, 7] input.
    (nn.Dense(11), (2, 5, 7), 2 * 5 * 11 * 7),
])
def test_single_layer_exact(layer, shape, expected):
  total, breakdown = _count(_Single(layer), shape)
  assert total == expected
  assert breakdown == {'layer': expected}


class _Block(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, (3, 3), name='conv')(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, name='bn')(x))
    return nn.Dense(self.features, name='fc')(x)


class _Net(nn.Module):
  """Two blocks, a rematerialised block, and a top-level 1x1 conv."""

  @nn.compact
  def __call__(self, x):
    x = _Block(4, name='block1')(x)
    x = _Block(8, name='block2')(x)
    x = nn.remat(_Block)(8, name='block3')(x)
    return nn.Conv(2, (1, 1), name='logits')(x)


def test_nested_breakdown_in_module_order():
  n = 6 * 6  # Pixels of the [1, 6, 6, 3] input; every layer keeps the size.
  block1 = n * 4 * 9 * 3 + n * 4 * 4
  block2 = n * 8 * 9 * 4 + n * 8 * 8
  block3 = n * 8 * 9 * 8 + n * 8 * 8
  logits = n * 2 * 8
  total, breakdown = _count(_Net(), (1, 6, 6, 3), depth=1)
  assert list(breakdown.items()) == [
      ('block1', block1), ('block2', block2), ('block3', block3), ('logits', logits)]
  assert total == block1 + block2 + block3 + logits
  _, deep = _count(_Net(), (1, 6, 6, 3), depth=None)
  assert deep['block2/conv'] == n * 8 * 9 * 4
  assert deep['block2/fc'] == n * 8 * 8
  assert deep['block3/conv'] == n * 8 * 9 * 8


class _Cell(nn.Module):

  @nn.compact
  def __call__(self, carry, x):
    return nn.Dense(5, name='fc')(carry) + x, None


class _Scanned(nn.Module):

  @nn.compact
  def __call__(self, x):
    cells = nn.scan(_Cell, variable_axes={'params': 0}, split_rngs={'params': True}, length=7)
    carry, _ = cells(name='cells')(x, jnp.zeros((7, 5)))
    return carry


def test_scan_multiplies_by_trip_count():
  total, breakdown = _count(_Scanned(), (3, 5))
  assert total == 7 * 3 * 5 * 5
  assert breakdown == {'cells/fc': total}


def _interpolation_matrix(out_size: int, in_size: int) -> np.ndarray:
  """Align-corners linear interpolation weights `[out, in]` (a fixed matrix, not learned)."""
  positions = np.arange(out_size) * (in_size - 1) / max(out_size - 1, 1)
  lower = np.minimum(np.floor(positions).astype(int), in_size - 2)
  frac = positions - lower
  weights = np.zeros((out_size, in_size), np.float32)
  weights[np.arange(out_size), lower] = 1 - frac
  weights[np.arange(out_size), lower + 1] += frac
  return weights


class _Upsampled(nn.Module):
  """A 1x1 conv, then a resize by two einsums: numpy constant rows, jnp-computed (iota) columns."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (1, 1), name='conv')(x)
    rows = jnp.asarray(_interpolation_matrix(9, 5))
    cols = jax.nn.one_hot(jnp.arange(11) * 7 // 11, 7)  # Built from iota: still input-independent.
    x = jnp.einsum('bhwc,Hh->bHwc', x, rows)
    return jax.jit(functools.partial(jnp.einsum, 'bhwc,Ww->bhWc'))(x, cols)


def test_resize_einsums_excluded_by_default():
  conv = 5 * 7 * 4 * 3
  resize = 9 * 7 * 4 * 5 + 9 * 11 * 4 * 7
  total, breakdown = _count(_Upsampled(), (1, 5, 7, 3))
  assert total == conv
  assert breakdown == {'conv': conv}
  total, breakdown = _count(_Upsampled(), (1, 5, 7, 3), include_resize=True)
  assert total == conv + resize
  assert breakdown == {'conv': conv, flops.TOP_LEVEL: resize}


class _Branchy(nn.Module):

  @nn.compact
  def __call__(self, x):
    small = nn.Dense(2, name='small')
    big = nn.Dense(9, name='big')
    if self.is_initializing():  # Create both layers' parameters.
      return small(x).sum() + big(x).sum()
    return nn.cond(x.sum() > 0, lambda m, v: big(v).sum(), lambda m, v: small(v).sum(), self, x)


def test_cond_counts_most_expensive_branch():
  total, breakdown = _count(_Branchy(), (4, 3))
  assert total == 4 * 9 * 3
  assert breakdown == {'big': total}


def test_while_loop_is_refused():
  closed_jaxpr = jax.make_jaxpr(
      lambda m: jax.lax.while_loop(lambda c: c.sum() < 9, lambda c: c @ c, m))(jnp.ones((3, 3)))
  with pytest.raises(ValueError, match='while_loop'):
    flops.count_jaxpr(closed_jaxpr)


def _counting_test_config(depthwise_impl='grouped'):
  config = tiny.get_config()
  config.model.depthwise_impl = depthwise_impl
  return config


def test_count_inference_sums_scales_and_flips():
  config = _counting_test_config()
  count = flops.count_inference(config, output_stride=16, scales=(0.5, 1.0, 1.5), flip=True)
  sizes = [(h, w, flipped) for h, w, flipped, _ in count.per_input]
  # scale_dimension(33, s) = int(32 * s + 1); each scale evaluated plain, then flipped.
  assert sizes == [(17, 17, False), (17, 17, True), (33, 33, False), (33, 33, True),
                   (49, 49, False), (49, 49, True)]
  singles = [flops.count_multiply_adds(config.model, size, output_stride=16)[0]
             for size in (17, 33, (49, 49))]
  assert len(set(singles)) == 3 and all(m > 0 for m in singles)
  assert [m for *_, m in count.per_input] == [m for m in singles for _ in range(2)]
  assert count.total == 2 * sum(singles)
  assert sum(count.breakdown.values()) == count.total
  # Defaults come from config.eval: one unflipped input at the eval crop and output stride.
  assert flops.count_inference(config).total == singles[1]


def test_output_stride_and_depthwise_impl():
  config = _counting_test_config()
  os16, _ = flops.count_multiply_adds(config.model, 33, output_stride=16)
  os8, _ = flops.count_multiply_adds(config.model, 33, output_stride=8)
  assert os8 > os16  # The late layers run on a 4x larger feature map.
  # The 'shifted' depthwise (elementwise mul/adds) is counted as the grouped conv it stands for.
  shifted_config = _counting_test_config('shifted')
  shifted, _ = flops.count_multiply_adds(shifted_config.model, 33, output_stride=16)
  assert shifted == os16


# Model zoo (g3doc/model_zoo.md) multiply-adds at 513x513, in billions.
@pytest.mark.parametrize('config_name, config_arg, output_stride, published', [
    ('voc_xception', None, 16, 54.17),
    ('voc_xception', None, 8, 177.10),
    ('voc_mobilenetv2', '1.0', 16, 2.75),
    ('voc_mobilenetv2', '0.5', 16, 0.88),
])
def test_published_figures_within_two_percent(config_name, config_arg, output_stride, published):
  module = importlib.import_module(f'configs.{config_name}')
  config = module.get_config(config_arg) if config_arg else module.get_config()
  count = flops.count_inference(config, output_stride=output_stride)
  assert count.total / 1e9 == pytest.approx(published, rel=0.02)


def test_published_multi_scale_flip_figure():
  # mobilenetv2_coco_voc_trainaug at OS8, scales [0.5:0.25:1.75], left-right flip: 152.59B.
  config = voc_mobilenetv2.get_config()
  count = flops.count_inference(config, output_stride=8,
                                scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True)
  heights = [h for h, _, flipped, _ in count.per_input if not flipped]
  assert heights == [257, 385, 513, 641, 769, 897]
  assert count.total / 1e9 == pytest.approx(152.59, rel=0.02)


def test_counting_resize_einsums_misses_published_figure():
  # Why the convention leaves resizes out: with them MobileNetV2 (whose logits upsampling 33 -> 513
  # is large next to its convs) lands more than 2% above the published 2.75B.
  config = voc_mobilenetv2.get_config()
  convs, _ = flops.count_multiply_adds(config.model, 513, output_stride=16)
  with_resize, _ = flops.count_multiply_adds(config.model, 513, output_stride=16,
                                             include_resize=True)
  assert with_resize / 1e9 > 2.75 * 1.02
  assert with_resize > convs


def test_command_line_prints_breakdown_and_total():
  config = voc_mobilenetv2.get_config('0.5')
  config.model.num_classes = 5
  expected = flops.count_inference(config, output_stride=8, scales=(0.5, 1.0), flip=True)
  repo = pathlib.Path(__file__).resolve().parents[1]
  result = subprocess.run(
      [sys.executable, '-m', 'deeplab_jax.flops', '--config=configs/voc_mobilenetv2.py:0.5',
       '--config.model.num_classes=5', '--output_stride=8', '--eval_scales=0.5,1.0', '--flip'],
      cwd=repo, capture_output=True, text=True, check=True, timeout=300)
  lines = result.stdout.strip().splitlines()
  assert lines[-1] == f'multiply-adds: {expected.total / 1e9:.2f}B'
  assert lines[-1] == flops.format_report(expected).splitlines()[-1]
  assert any(line.startswith('MobilenetV2/expanded_conv_16/project ') for line in lines)
  assert any(line.startswith('logits/semantic ') for line in lines)
  assert 'input 257x257 flipped' in result.stdout
