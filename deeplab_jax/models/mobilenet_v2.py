"""MobileNetV2 feature extractor as DeepLab uses it (slim `mobilenet_v2.V2_DEF` up to `layer_18`).

ReLU6 everywhere, TF 'SAME' padding (also for strided convs, unlike Xception/ResNet), BatchNorm decay 0.997
and epsilon 1e-3. Channel counts follow slim's `_make_divisible` with `divisible_by=8, min_depth=8` at depth
multiplier 1.0 and `divisible_by=1, min_depth=1` otherwise (official `feature_extractor._mobilenet_v2`);
expansion sizes are always rounded to multiples of 8. The last 1x1 conv to 1280 channels is not built.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from deeplab_jax.models import backbones
from deeplab_jax.models import layers

Array = jax.Array

# (num_outputs, stride, expansion factor) for expanded_conv, expanded_conv_1, ..., expanded_conv_16.
_V2_DEF = ((16, 1, 1),
           (24, 2, 6), (24, 1, 6),
           (32, 2, 6), (32, 1, 6), (32, 1, 6),
           (64, 2, 6), (64, 1, 6), (64, 1, 6), (64, 1, 6),
           (96, 1, 6), (96, 1, 6), (96, 1, 6),
           (160, 2, 6), (160, 1, 6), (160, 1, 6),
           (320, 1, 6))


def make_divisible(value: float, divisor: int, min_value: Optional[int] = None) -> int:
  """slim's `_make_divisible`: round to a multiple of `divisor`, never below 90% of `value`."""
  min_value = min_value or divisor
  new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if new_value < 0.9 * value:
    new_value += divisor
  return int(new_value)


def layer_schedule(depth_multiplier: float, output_stride: Optional[int]):
  """(scope, expansion factor, num_outputs, stride, rate) of the 17 expanded convs after atrous conversion.

  `output_stride=None` keeps the nominal strides (output stride 32).
  """
  divisible_by, min_depth = (8, 8) if depth_multiplier == 1.0 else (1, 1)
  # `Conv` (stride 2) comes first.
  schedule = layers.atrous_schedule([stride for _, stride, _ in _V2_DEF], output_stride, start_stride=2,
                                    network='MobileNetV2')
  return [('expanded_conv' if i == 0 else f'expanded_conv_{i}', expansion,
           make_divisible(outputs * depth_multiplier, divisible_by, min_depth), stride, rate)
          for i, ((outputs, _, expansion), (stride, rate)) in enumerate(zip(_V2_DEF, schedule))]


def stem_depth(depth_multiplier: float) -> int:
  divisible_by, min_depth = (8, 8) if depth_multiplier == 1.0 else (1, 1)
  return make_divisible(32 * depth_multiplier, divisible_by, min_depth)


class ExpandedConv(nn.Module):
  """Inverted residual: [expand 1x1 -> BN -> ReLU6] -> depthwise 3x3 -> BN -> ReLU6 -> project -> BN."""
  expansion: int
  num_outputs: int
  stride: int
  rate: int
  train: bool
  bn: layers.BNConfig
  depthwise_impl: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array):
    kw = dict(train=self.train, bn=self.bn, dtype=self.dtype)
    in_depth = x.shape[-1]
    # The first block uses `expand_input_by_factor(1, divisible_by=1)`, the rest multiples of 8.
    inner = in_depth if self.expansion == 1 else make_divisible(in_depth * self.expansion, 8)
    net = x
    if inner > in_depth:
      net = layers.conv_bn(net, inner, 1, name='expand', activation=layers.relu6, **kw)
    net = layers.depthwise_conv(net, 3, name='depthwise', stride=self.stride, rate=self.rate,
                                padding='SAME', impl=self.depthwise_impl, dtype=self.dtype)
    net = layers.batch_norm(net, name='depthwise/BatchNorm', train=self.train, decay=self.bn.decay,
                            epsilon=self.bn.epsilon, dtype=self.dtype)
    depthwise_output = layers.relu6(net)
    net = layers.conv_bn(depthwise_output, self.num_outputs, 1, name='project', activation=None, **kw)
    if self.stride == 1 and in_depth == self.num_outputs:
      net = net + x
    return net, depthwise_output


class MobileNetV2(backbones.Backbone):
  """MobileNetV2 backbone, TF scope `MobilenetV2`.

  Returns `Features(out = layer_18, end_points)`; each expanded conv's end point is its depthwise output
  (official `layer_<k>/depthwise_output`; layer_k is expanded_conv_{k-2}).
  """

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> backbones.Features:
    x = layers.conv_bn(x, stem_depth(self.depth_multiplier), 3, name='Conv', stride=2,
                       padding='SAME', activation=layers.relu6, train=train, bn=self.bn,
                       dtype=self.dtype)
    block_cls = self.unit(ExpandedConv)
    end_points = {}
    for scope, expansion, outputs, stride, rate in layer_schedule(self.depth_multiplier,
                                                                  self.output_stride):
      x, end_points[scope] = block_cls(expansion, outputs, stride, rate, train, self.bn,
                                       self.depthwise_impl, self.dtype, name=scope)(x)
    return backbones.Features(x, end_points)


backbones.register(backbones.BackboneSpec(
    name='mobilenet_v2', module=MobileNetV2, scope='MobilenetV2', variant={}, bn_decay=0.997,
    bn_epsilon=1e-3, preprocessing='inception',
    decoder_end_points={4: 'expanded_conv_2', 8: 'expanded_conv_5', 16: 'expanded_conv_12'},
    imagenet_classifier=r'^MobilenetV2/(Conv_1|Logits)/', depth_multiplier=True))
