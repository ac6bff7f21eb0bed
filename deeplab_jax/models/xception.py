"""Aligned Xception-41/65/71 as in DeepLabV3+ (tensorflow/models research/deeplab core/xception.py).

Every unit is three separable convs (depthwise -> BN -> pointwise -> BN), each preceded by a ReLU; no ReLU
after the residual sum. Only exit_flow/block2 puts the ReLU inside the separable convs (after each BN) and
has no leading ReLU. Strided convs pad explicitly and symmetrically (TF `fixed_padding`, `layers.explicit_pads`), the 1x1 shortcut
uses SAME. The atrous conversion follows `stack_blocks_dense`: once the running stride reaches the target,
later units run at stride 1 and the rate is multiplied by the stride they skipped.
"""
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deeplab_jax.models import backbones
from deeplab_jax.models import layers

Array = jax.Array

# (scope, depth_list, skip_connection_type, activation_fn_in_separable_conv, num_units, stride)
_ENTRY_65 = (
    ('entry_flow/block1', (128, 128, 128), 'conv', False, 1, 2),
    ('entry_flow/block2', (256, 256, 256), 'conv', False, 1, 2),
    ('entry_flow/block3', (728, 728, 728), 'conv', False, 1, 2),
)
_ENTRY_71 = (
    ('entry_flow/block1', (128, 128, 128), 'conv', False, 1, 2),
    ('entry_flow/block2', (256, 256, 256), 'conv', False, 1, 1),
    ('entry_flow/block3', (256, 256, 256), 'conv', False, 1, 2),
    ('entry_flow/block4', (728, 728, 728), 'conv', False, 1, 1),
    ('entry_flow/block5', (728, 728, 728), 'conv', False, 1, 2),
)
_EXIT = (
    ('exit_flow/block1', (728, 1024, 1024), 'conv', False, 1, 2),
    ('exit_flow/block2', (1536, 1536, 2048), 'none', True, 1, 1),
)


def _middle(num_units: int):
  return (('middle_flow/block1', (728, 728, 728), 'sum', False, num_units, 1),)


def unit_scopes(blocks) -> list:
  """`<block>/unit_<i>` of every unit of a block layout, in order."""
  return [f'{scope}/unit_{i + 1}' for scope, _, _, _, num_units, _ in blocks for i in range(num_units)]


def unit_schedule(blocks, output_stride: int, multi_grid=(1, 1, 1), network: str = 'xception'):
  """(unit_scope, depth_list, skip, act_in_sep, stride, rate, unit_rates) after the atrous conversion.

  Raises:
    ValueError: if the output stride cannot be reached by this network.
  """
  units = [(f'{scope}/unit_{i + 1}', depths, skip, act, stride,
            tuple(multi_grid) if scope == 'exit_flow/block2' else (1, 1, 1))
           for scope, depths, skip, act, num_units, stride in blocks for i in range(num_units)]
  # The stem conv1_1 already has stride 2.
  schedule = layers.atrous_schedule([u[4] for u in units], output_stride, start_stride=2, network=network)
  return [(scope, depths, skip, act, stride, rate, unit_rates)
          for (scope, depths, skip, act, _, unit_rates), (stride, rate) in zip(units, schedule)]


class XceptionModule(nn.Module):
  """One Xception unit (TF scope `<block>/unit_<i>/xception_module`).

  Returns `(outputs, tap)` where `tap` is the `separable_conv2_pointwise` BatchNorm output, the decoder's
  low-level feature in the official model.
  """
  depth_list: Tuple[int, int, int]
  skip_connection_type: str
  activation_fn_in_separable_conv: bool
  stride: int
  rate: int
  unit_rate_list: Tuple[int, int, int]
  train: bool
  bn: layers.BNConfig
  depthwise_impl: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: Array) -> Tuple[Array, Array]:
    residual, tap = inputs, None
    act = nn.relu if self.activation_fn_in_separable_conv else None
    for i in range(3):
      if not self.activation_fn_in_separable_conv:
        residual = layers.activate(residual, nn.relu, defer=True, train=self.train)
      stride = self.stride if i == 2 else 1
      residual = layers.separable_conv_bn(
          residual, self.depth_list[i], 3, name=f'separable_conv{i + 1}', train=self.train,
          bn=self.bn, stride=stride, rate=self.rate * self.unit_rate_list[i], padding='EXPLICIT',
          depthwise_activation=act, pointwise_activation=act, impl=self.depthwise_impl,
          dtype=self.dtype, defer_output=i < 2)
      if i == 1:
        tap = layers.as_array(residual)
    if self.skip_connection_type == 'conv':
      shortcut = layers.conv_bn(inputs, self.depth_list[-1], 1, name='shortcut', train=self.train,
                                bn=self.bn, stride=self.stride, activation=None, dtype=self.dtype)
      outputs = residual + shortcut
    elif self.skip_connection_type == 'sum':
      outputs = residual + inputs
    elif self.skip_connection_type == 'none':
      outputs = residual
    else:
      raise ValueError(f'Unsupported skip connection type {self.skip_connection_type!r}.')
    return outputs, tap


class Xception(backbones.Backbone):
  """Aligned Xception backbone; the module's name is the TF scope (`xception_65`, ...).

  Returns `Features(out [B, H/os, W/os, 2048], end_points)`; each unit's end point is its
  `separable_conv2_pointwise` BN output (the official decoder taps).
  """

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> backbones.Features:
    blocks = self.spec.variant['blocks']
    x = layers.conv_bn(x, 32, 3, name='entry_flow/conv1_1', train=train, bn=self.bn, stride=2,
                       padding='EXPLICIT', dtype=self.dtype)
    x = layers.conv_bn(x, 64, 3, name='entry_flow/conv1_2', train=train, bn=self.bn,
                       padding='EXPLICIT', dtype=self.dtype)
    module_cls = self.unit(XceptionModule)
    end_points = {}
    for scope, depths, skip, act_in_sep, stride, rate, unit_rates in unit_schedule(
        blocks, self.output_stride, self.multi_grid, self.spec.name):
      x, end_points[scope] = module_cls(depths, skip, act_in_sep, stride, rate, unit_rates, train, self.bn,
                                        self.depthwise_impl, self.dtype,
                                        name=f'{scope}/xception_module')(x)
    return backbones.Features(x, end_points)


def register(name: str, blocks, decoder_end_points) -> None:
  """Registers an aligned Xception variant: its block layout and decoder end points by stride."""
  backbones.register(backbones.BackboneSpec(
      name=name, module=Xception, scope=name, variant={'blocks': blocks}, bn_decay=0.9997,
      bn_epsilon=1e-3, preprocessing='inception', decoder_end_points=decoder_end_points,
      imagenet_classifier=rf'^{name}/logits/', multi_grid=True))


# Decoder end points by stride: the official `networks_to_feature_maps`.
register('xception_41', _ENTRY_65 + _middle(8) + _EXIT,
          {4: 'entry_flow/block2/unit_1', 8: 'entry_flow/block3/unit_1', 16: 'exit_flow/block1/unit_1'})
register('xception_65', _ENTRY_65 + _middle(16) + _EXIT,
          {4: 'entry_flow/block2/unit_1', 8: 'entry_flow/block3/unit_1', 16: 'exit_flow/block1/unit_1'})
register('xception_71', _ENTRY_71 + _middle(16) + _EXIT,
          {4: 'entry_flow/block3/unit_1', 8: 'entry_flow/block5/unit_1', 16: 'exit_flow/block1/unit_1'})
