"""VGG-16 as DeepLab V1/V2 use it (DeepLab-LargeFOV, Chen et al. 2015; DeepLab v2 Caffe prototxts).

conv1_1 ... conv5_3 (3x3, ReLU, biases, no BatchNorm); pool1..pool5 are 3x3 max pools with padding 1. At the
nominal output stride 8, pool4 and pool5 have stride 1 and conv5_x runs at rate 2 (the 'hole' algorithm);
other output strides follow the same atrous rule as the other backbones: a pool that would overshoot the
target stride runs at stride 1 and multiplies the rate of everything after it.
"""
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from deeplab_jax.models import layers

Array = jax.Array

_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


class VGG16(nn.Module):
  """VGG-16 trunk, scope `vgg_16`. Returns `{'out': pool5 features, 'low_level': pool2}`.

  The heads' rates are defined at output stride 8 (LargeFOV fc6: 12); `create_model` scales them.
  """
  output_stride: int = 8
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Dict[str, Array]:
    del train  # no BatchNorm, no dropout in the trunk
    if self.output_stride not in (8, 16, 32):
      raise ValueError(f'output_stride={self.output_stride} for vgg_16 must be 8, 16 or 32.')
    current_stride, rate, low_level = 1, 1, None
    for stage, (features, num_convs) in enumerate(_STAGES, start=1):
      for i in range(1, num_convs + 1):
        x = nn.relu(layers.conv(x, features, 3, name=f'conv{stage}/conv{stage}_{i}', rate=rate,
                                use_bias=True, dtype=self.dtype))
      if current_stride < self.output_stride:
        x = layers.max_pool(x, 3, 2, ((1, 1), (1, 1)))
        current_stride *= 2
      else:
        # DeepLab keeps these pools as 3x3 / stride 1 / pad 1 (not dilated) and dilates what follows.
        x = layers.max_pool(x, 3, 1, ((1, 1), (1, 1)))
        rate *= 2
      if stage == 2:
        low_level = x
    return {'out': x, 'low_level': low_level}

