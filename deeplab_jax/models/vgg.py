"""VGG-16 as DeepLab V1/V2 use it (DeepLab-LargeFOV, Chen et al. 2015; DeepLab v2 Caffe prototxts).

conv1_1 ... conv5_3 (3x3, ReLU, biases, no BatchNorm); pool1..pool5 are 3x3 max pools with padding 1. At the
nominal output stride 8, pool4 and pool5 have stride 1 and conv5_x runs at rate 2 (the 'hole' algorithm);
other output strides follow the same atrous rule as the other backbones (`layers.atrous_schedule`): a pool
that would overshoot the target stride runs at stride 1 and multiplies the rate of everything after it.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deeplab_jax.models import backbones
from deeplab_jax.models import layers

Array = jax.Array

_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


class VGGStage(nn.Module):
  """conv<s>_1 .. conv<s>_n (3x3 at `rate`, ReLU) then pool<s> (3x3, `pool_stride`, pad 1); scope `conv<s>`."""
  stage: int
  features: int
  num_convs: int
  rate: int
  pool_stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i in range(1, self.num_convs + 1):
      x = nn.relu(layers.conv(x, self.features, 3, name=f'conv{self.stage}_{i}', rate=self.rate,
                              use_bias=True, dtype=self.dtype))
    # DeepLab keeps a converted pool as 3x3 / stride 1 / pad 1 (not dilated) and dilates what follows.
    return layers.max_pool(x, 3, self.pool_stride, ((1, 1), (1, 1)))


class VGG16(backbones.Backbone):
  """VGG-16 trunk, scope `vgg_16`. Returns `Features(out = pool5, end_points = {'pool<s>': ...})`.

  The heads' rates are defined at output stride 8 (LargeFOV fc6: 12); `create_model` scales them.
  """

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> backbones.Features:
    del train  # no BatchNorm, no dropout in the trunk
    schedule = layers.atrous_schedule([2] * len(_STAGES), self.output_stride, network='vgg_16')
    stage_cls = self.unit(VGGStage)
    end_points = {}
    for stage, ((features, num_convs), (pool_stride, rate)) in enumerate(zip(_STAGES, schedule), start=1):
      x = stage_cls(stage, features, num_convs, rate, pool_stride, self.dtype, name=f'conv{stage}')(x)
      end_points[f'pool{stage}'] = x
    return backbones.Features(x, end_points)


backbones.register(backbones.BackboneSpec(
    name='vgg_16', module=VGG16, scope='vgg_16', variant={}, bn_decay=0.9997, bn_epsilon=1e-3,
    preprocessing='mean_subtraction', imagenet_classifier=r'^vgg_16/fc8/'))
