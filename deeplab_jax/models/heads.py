"""DeepLab heads: LargeFOV (V1), ASPP-L (V2), ASPP with image pooling (V3) and the V3+ decoder.

ASPP and decoder follow tensorflow/models research/deeplab model.py: every conv is conv -> BN (decay 0.9997,
epsilon 1e-5) -> ReLU; separable convs are depthwise -> BN -> ReLU -> pointwise -> BN -> ReLU; ASPP concat
order is [image_pooling, aspp0, aspp1, ...]; the decoder concatenates [aspp, feature_projection0] at
stride 4. V1/V2 heads follow the DeepLab Caffe prototxts (fc6/fc7/fc8 with biases and dropout, no BN).
"""
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deeplab_jax.models import layers

Array = jax.Array
HEAD_BN = layers.BNConfig(0.9997, 1e-5)


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling (V3): image pooling + 1x1 + 3x3 atrous branches, 1x1 projection.

  With `atrous_rates=()` it is the MobileNetV2 head (image pooling + 1x1 branch only).
  Returns `[B, h, w, filters]`.
  """
  atrous_rates: Tuple[int, ...] = (6, 12, 18)
  filters: int = 256
  separable: bool = True
  image_pooling: bool = True
  dropout_rate: float = 0.1
  bn: layers.BNConfig = HEAD_BN
  depthwise_impl: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Array, train: bool = False) -> Array:
    kw = dict(train=train, bn=self.bn, dtype=self.dtype)
    branches = []
    if self.image_pooling:
      # The official avg-pool window is scale_dimension(crop, 1/os), the whole map at the crop size.
      pooled = jnp.mean(features, axis=(1, 2), keepdims=True)
      pooled = layers.conv_bn(pooled, self.filters, 1, name='image_pooling', **kw)
      branches.append(jnp.broadcast_to(pooled, features.shape[:3] + (self.filters,)))
    branches.append(layers.conv_bn(features, self.filters, 1, name='aspp0', **kw))
    for i, rate in enumerate(self.atrous_rates, start=1):
      if self.separable:
        branches.append(layers.separable_conv_bn(
            features, self.filters, 3, name=f'aspp{i}', rate=rate, impl=self.depthwise_impl, **kw))
      else:
        branches.append(layers.conv_bn(features, self.filters, 3, name=f'aspp{i}', rate=rate, **kw))
    x = jnp.concatenate(branches, axis=-1)
    x = layers.conv_bn(x, self.filters, 1, name='concat_projection', **kw)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


class Decoder(nn.Module):
  """DeepLabV3+ decoder: 48-channel projection of the low-level feature, concat, two 3x3 convs."""
  filters: int = 256
  projection_filters: int = 48
  separable: bool = True
  bn: layers.BNConfig = HEAD_BN
  depthwise_impl: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Array, low_level: Array, size: Sequence[int],
               train: bool = False) -> Array:
    kw = dict(train=train, bn=self.bn, dtype=self.dtype)
    projection = layers.conv_bn(low_level, self.projection_filters, 1, name='feature_projection0', **kw)
    x = jnp.concatenate([layers.resize_bilinear(features, size),
                         layers.resize_bilinear(projection, size)], axis=-1)
    for i in range(2):
      # The first conv's BatchNorm is computed by the second conv on CPU (`layers.Normalized`).
      if self.separable:
        x = layers.separable_conv_bn(x, self.filters, 3, name=f'decoder_conv{i}',
                                     impl=self.depthwise_impl, defer_output=i == 0, **kw)
      else:  # official slim.repeat scopes: decoder_conv0/decoder_conv0_{1,2}
        x = layers.conv_bn(x, self.filters, 3, name=f'decoder_conv0/decoder_conv0_{i + 1}',
                           defer_output=i == 0, **kw)
    return x


class LargeFOV(nn.Module):
  """DeepLab-LargeFOV (V1): fc6 3x3 at rate 12 (1024) -> fc7 1x1 (1024) -> fc8 logits, dropout 0.5."""
  num_classes: int
  rate: int = 12
  hidden: int = 1024
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    x = nn.relu(layers.conv(x, self.hidden, 3, name='fc6', rate=self.rate, use_bias=True,
                            dtype=self.dtype))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.relu(layers.conv(x, self.hidden, 1, name='fc7', use_bias=True, dtype=self.dtype))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return layers.conv(x, self.num_classes, 1, name='fc8', use_bias=True, dtype=self.dtype,
                       kernel_init=nn.initializers.normal(0.01))


class ASPPL(nn.Module):
  """ASPP-L (V2): parallel branches at rates 6/12/18/24, each ending in class logits, summed.

  With `hidden > 0` each branch is fc6 (3x3 atrous) -> fc7 (1x1) -> fc8 (VGG-16 DeepLab-v2); with
  `hidden == 0` each branch is a single 3x3 atrous conv to the classes (ResNet-101 DeepLab-v2).
  """
  num_classes: int
  atrous_rates: Tuple[int, ...] = (6, 12, 18, 24)
  hidden: int = 1024
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    logits = []
    init = nn.initializers.normal(0.01)
    for i, rate in enumerate(self.atrous_rates, start=1):
      if self.hidden:
        y = nn.relu(layers.conv(x, self.hidden, 3, name=f'branch{i}/fc6', rate=rate, use_bias=True,
                                dtype=self.dtype))
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = nn.relu(layers.conv(y, self.hidden, 1, name=f'branch{i}/fc7', use_bias=True,
                                dtype=self.dtype))
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = layers.conv(y, self.num_classes, 1, name=f'branch{i}/fc8', use_bias=True,
                        dtype=self.dtype, kernel_init=init)
      else:
        y = layers.conv(x, self.num_classes, 3, name=f'branch{i}/fc8', rate=rate, use_bias=True,
                        dtype=self.dtype, kernel_init=init)
      logits.append(y)
    return sum(logits[1:], logits[0])
