"""ResNet-v1-50/101 and the DeepLab `_beta` variants (tensorflow/models research/deeplab core/resnet_v1_beta.py).

`_beta` replaces the 7x7 stem by three 3x3 convs (64, 64, 128). Each block puts its stride on the LAST unit's
3x3 conv (slim resnet_v1 layout); block4 has three units whose rates are the multi-grid rates. Strided convs
pad explicitly (`conv2d_same`); the identity shortcut of a strided unit is a 1x1 subsample.
"""
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deeplab_jax.models import backbones
from deeplab_jax.models import layers

Array = jax.Array


def unit_schedule(units_per_block: Tuple[int, int, int], output_stride: int, multi_grid=(1, 1, 1),
                  network: str = 'resnet'):
  """(unit_scope, depth, depth_bottleneck, stride, rate) of every unit after the atrous conversion.

  Blocks 1-3 stride in their last unit; block4 has one unit per multi-grid rate, each multiplying the
  block's atrous rate by its own.
  """
  units = []
  for b, (base, num_units) in enumerate(zip((64, 128, 256), units_per_block)):
    units += [(f'block{b + 1}/unit_{u + 1}', base * 4, base, 2 if u == num_units - 1 else 1, 1)
              for u in range(num_units)]
  units += [(f'block4/unit_{u + 1}', 2048, 512, 1, r) for u, r in enumerate(multi_grid)]
  # conv1 and pool1 give stride 4.
  schedule = layers.atrous_schedule([u[3] for u in units], output_stride, start_stride=4, network=network)
  return [(scope, d, db, stride, rate * unit_rate)
          for (scope, d, db, _, unit_rate), (stride, rate) in zip(units, schedule)]


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
    # conv1's and conv2's BatchNorms are computed by the next conv on CPU (`layers.Normalized`).
    residual = layers.conv_bn(x, self.depth_bottleneck, 1, name='conv1', defer_output=True, **kw)
    residual = layers.conv_bn(residual, self.depth_bottleneck, 3, name='conv2', stride=self.stride,
                              rate=self.rate, padding='EXPLICIT', defer_output=True, **kw)
    residual = layers.conv_bn(residual, self.depth, 1, name='conv3', activation=None, **kw)
    return layers.residual_relu(shortcut + residual), residual


class ResNet(backbones.Backbone):
  """ResNet-v1 backbone named by its TF scope (`resnet_v1_101` also for the beta variant).

  Returns `Features(out [B, H/os, W/os, 2048], end_points)`; each unit's end point is its conv3 BN output
  (the official decoder taps).
  """

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> backbones.Features:
    kw = dict(train=train, bn=self.bn, dtype=self.dtype)
    if self.spec.variant['beta']:
      x = layers.conv_bn(x, 64, 3, name='conv1_1', stride=2, padding='EXPLICIT', **kw)
      x = layers.conv_bn(x, 64, 3, name='conv1_2', padding='EXPLICIT', **kw)
      x = layers.conv_bn(x, 128, 3, name='conv1_3', padding='EXPLICIT', **kw)
    else:
      x = layers.conv_bn(x, 64, 7, name='conv1', stride=2, padding='EXPLICIT', **kw)
    x = layers.max_pool(x, 3, 2, 'SAME')
    unit_cls = self.unit(Bottleneck)
    end_points = {}
    for scope, d, db, stride, rate in unit_schedule(self.spec.variant['units'], self.output_stride,
                                                    self.multi_grid, self.spec.name):
      x, end_points[scope] = unit_cls(d, db, stride, rate, train, self.bn, self.dtype,
                                      name=f'{scope}/bottleneck_v1')(x)
    return backbones.Features(x, end_points)


def register(depth: int, units: Tuple[int, int, int], beta: bool) -> None:
  """Registers `resnet_v1_<depth>[_beta]` with `units` bottlenecks in blocks 1-3 (block4 has the multi-grid)."""
  scope = f'resnet_v1_{depth}'
  backbones.register(backbones.BackboneSpec(
      name=scope + ('_beta' if beta else ''), module=ResNet, scope=scope,
      variant={'units': units, 'beta': beta}, bn_decay=0.95, bn_epsilon=1e-5,
      # The original ResNets take ImageNet-mean-subtracted pixels; the `_beta` checkpoints x*2/255-1.
      preprocessing='inception' if beta else 'mean_subtraction',
      # The unit before each block's strided last unit (official `networks_to_feature_maps`).
      decoder_end_points={4 * 2**b: f'block{b + 1}/unit_{units[b] - 1}' for b in range(3)},
      imagenet_classifier=rf'^{scope}/logits/', multi_grid=True))


register(50, (3, 4, 6), beta=False)
register(50, (3, 4, 6), beta=True)
register(101, (3, 4, 23), beta=False)
register(101, (3, 4, 23), beta=True)
