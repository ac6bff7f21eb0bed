"""ResNet-v1-50/101 and the DeepLab `_beta` variants (tensorflow/models research/deeplab core/resnet_v1_beta.py).

`_beta` replaces the 7x7 stem by three 3x3 convs (64, 64, 128). Each block puts its stride on the LAST unit's
3x3 conv (slim resnet_v1 layout); block4 has three units whose rates are the multi-grid rates. Strided convs
pad explicitly (`conv2d_same`); the identity shortcut of a strided unit is a 1x1 subsample.
"""
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deeplab_jax.models import layers

Array = jax.Array

_UNITS = {'resnet_v1_50': (3, 4, 6), 'resnet_v1_101': (3, 4, 23)}

DECODER_END_POINTS = {
    'resnet_v1_50': {4: 'block1/unit_2', 8: 'block2/unit_3', 16: 'block3/unit_5'},
    'resnet_v1_101': {4: 'block1/unit_2', 8: 'block2/unit_3', 16: 'block3/unit_22'},
}


def unit_schedule(depth: str, output_stride: int, multi_grid=(1, 1, 1)):
  """Yields (unit_scope, depth, depth_bottleneck, stride, rate) after the atrous conversion."""
  if output_stride % 4:
    raise ValueError(f'output_stride={output_stride} must be a multiple of 4 for ResNet.')
  target = output_stride // 4  # conv1 and pool1 give stride 4
  blocks = []
  for b, (base, units) in enumerate(zip((64, 128, 256), _UNITS[depth])):
    blocks.append([(f'block{b + 1}/unit_{u + 1}', base * 4, base, 2 if u == units - 1 else 1, 1)
                   for u in range(units)])
  blocks.append([(f'block4/unit_{u + 1}', 2048, 512, 1, r) for u, r in enumerate(multi_grid)])
  current_stride, rate, schedule = 1, 1, []
  for block in blocks:
    for scope, d, db, stride, unit_rate in block:
      if current_stride > target:
        raise ValueError(f'output_stride={output_stride} cannot be reached by {depth}.')
      if current_stride == target:
        schedule.append((scope, d, db, 1, rate * unit_rate))
        rate *= stride
      else:
        schedule.append((scope, d, db, stride, unit_rate))
        current_stride *= stride
  if current_stride != target:
    raise ValueError(f'output_stride={output_stride} cannot be reached by {depth}.')
  return schedule


class Bottleneck(nn.Module):
  """`bottleneck_v1`: 1x1 -> 3x3 (stride, rate) -> 1x1, relu(shortcut + residual)."""
  depth: int
  depth_bottleneck: int
  stride: int
  rate: int
  train: bool
  bn: layers.BNConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Tuple[Array, Array]:
    kw = dict(train=self.train, bn=self.bn, dtype=self.dtype)
    if x.shape[-1] == self.depth:
      shortcut = x[:, ::self.stride, ::self.stride, :] if self.stride > 1 else x
    else:
      shortcut = layers.conv_bn(x, self.depth, 1, name='shortcut', stride=self.stride,
                                activation=None, **kw)
    residual = layers.conv_bn(x, self.depth_bottleneck, 1, name='conv1', **kw)
    residual = layers.conv_bn(residual, self.depth_bottleneck, 3, name='conv2', stride=self.stride,
                              rate=self.rate, padding='EXPLICIT', **kw)
    residual = layers.conv_bn(residual, self.depth, 1, name='conv3', activation=None, **kw)
    return nn.relu(shortcut + residual), residual


class ResNet(nn.Module):
  """ResNet-v1 backbone named by its TF scope (`resnet_v1_101` also for the beta variant).

  Returns `{'out': [B, H/os, W/os, 2048], 'low_level': conv3 BN output of the decoder end point}`.
  """
  depth: str = 'resnet_v1_101'
  beta: bool = True
  output_stride: int = 16
  multi_grid: Tuple[int, ...] = (1, 2, 4)
  low_level_stride: int = 4
  bn: layers.BNConfig = layers.BNConfig(0.95, 1e-5)
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Dict[str, Array]:
    if self.depth not in _UNITS:
      raise ValueError(f'Unknown ResNet depth {self.depth!r}; expected one of {tuple(_UNITS)}.')
    kw = dict(train=train, bn=self.bn, dtype=self.dtype)
    if self.beta:
      x = layers.conv_bn(x, 64, 3, name='conv1_1', stride=2, padding='EXPLICIT', **kw)
      x = layers.conv_bn(x, 64, 3, name='conv1_2', padding='EXPLICIT', **kw)
      x = layers.conv_bn(x, 128, 3, name='conv1_3', padding='EXPLICIT', **kw)
    else:
      x = layers.conv_bn(x, 64, 7, name='conv1', stride=2, padding='EXPLICIT', **kw)
    x = layers.max_pool(x, 3, 2, 'SAME')
    tap_unit = DECODER_END_POINTS[self.depth].get(self.low_level_stride)
    unit_cls = nn.remat(Bottleneck) if self.remat else Bottleneck
    low_level = None
    for scope, d, db, stride, rate in unit_schedule(self.depth, self.output_stride, self.multi_grid):
      x, residual = unit_cls(d, db, stride, rate, train, self.bn, self.dtype,
                             name=f'{scope}/bottleneck_v1')(x)
      if scope == tap_unit:
        low_level = residual
    return {'out': x, 'low_level': low_level}
