"""Aligned Xception-41/65/71 as in DeepLabV3+ (tensorflow/models research/deeplab core/xception.py).

Every unit is three separable convs (depthwise -> BN -> pointwise -> BN), each preceded by a ReLU; no ReLU
after the residual sum. Only exit_flow/block2 puts the ReLU inside the separable convs (after each BN) and
has no leading ReLU. Strided convs pad explicitly and symmetrically (TF `fixed_padding`, `layers.explicit_pads`), the 1x1 shortcut
uses SAME. The atrous conversion follows `stack_blocks_dense`: once the running stride reaches the target,
later units run at stride 1 and the rate is multiplied by the stride they skipped.
"""
from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

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


BLOCKS = {
    'xception_41': _ENTRY_65 + _middle(8) + _EXIT,
    'xception_65': _ENTRY_65 + _middle(16) + _EXIT,
    'xception_71': _ENTRY_71 + _middle(16) + _EXIT,
}

# The unit whose `separable_conv2_pointwise` BN output feeds the decoder, by decoder output stride
# (official `networks_to_feature_maps`).
DECODER_END_POINTS = {
    'xception_41': {4: 'entry_flow/block2/unit_1', 8: 'entry_flow/block3/unit_1',
                    16: 'exit_flow/block1/unit_1'},
    'xception_65': {4: 'entry_flow/block2/unit_1', 8: 'entry_flow/block3/unit_1',
                    16: 'exit_flow/block1/unit_1'},
    'xception_71': {4: 'entry_flow/block3/unit_1', 8: 'entry_flow/block5/unit_1',
                    16: 'exit_flow/block1/unit_1'},
}


def unit_schedule(variant: str, output_stride: int, multi_grid: Sequence[int] = (1, 1, 1)):
  """Yields (unit_scope, depth_list, skip, act_in_sep, stride, rate, unit_rates) after atrous conversion.

  Raises:
    ValueError: if the output stride cannot be reached by this network.
  """
  if output_stride % 2:
    raise ValueError(f'output_stride={output_stride} must be a multiple of 2.')
  target = output_stride // 2  # the stem conv1_1 already has stride 2
  current_stride, rate = 1, 1
  schedule = []
  for scope, depths, skip, act_in_sep, num_units, stride in BLOCKS[variant]:
    unit_rates = tuple(multi_grid) if scope == 'exit_flow/block2' else (1, 1, 1)
    for i in range(num_units):
      if current_stride > target:
        raise ValueError(f'output_stride={output_stride} cannot be reached by {variant}.')
      if current_stride == target:
        schedule.append((f'{scope}/unit_{i + 1}', depths, skip, act_in_sep, 1, rate, unit_rates))
        rate *= stride
      else:
        schedule.append((f'{scope}/unit_{i + 1}', depths, skip, act_in_sep, stride, 1, unit_rates))
        current_stride *= stride
  if current_stride != target:
    raise ValueError(f'output_stride={output_stride} cannot be reached by {variant} '
                     f'(its nominal stride is {2 * current_stride}).')
  return schedule


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
        residual = nn.relu(residual)
      stride = self.stride if i == 2 else 1
      residual = layers.separable_conv_bn(
          residual, self.depth_list[i], 3, name=f'separable_conv{i + 1}', train=self.train,
          bn=self.bn, stride=stride, rate=self.rate * self.unit_rate_list[i], padding='EXPLICIT',
          depthwise_activation=act, pointwise_activation=act, impl=self.depthwise_impl,
          dtype=self.dtype)
      if i == 1:
        tap = residual
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


class Xception(nn.Module):
  """Aligned Xception backbone; the module's name is the TF scope (`xception_65`, ...).

  Returns `{'out': [B, H/os, W/os, 2048], 'low_level': [B, H/4, W/4, C]}` (low-level at
  `low_level_stride`, taken from the official decoder end point).
  """
  variant: str = 'xception_65'
  output_stride: int = 16
  multi_grid: Tuple[int, ...] = (1, 1, 1)
  low_level_stride: int = 4
  bn: layers.BNConfig = layers.BNConfig(0.9997, 1e-3)
  depthwise_impl: str = 'auto'
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Dict[str, Array]:
    if self.variant not in BLOCKS:
      raise ValueError(f'Unknown Xception variant {self.variant!r}; expected one of {tuple(BLOCKS)}.')
    x = layers.conv_bn(x, 32, 3, name='entry_flow/conv1_1', train=train, bn=self.bn, stride=2,
                       padding='EXPLICIT', dtype=self.dtype)
    x = layers.conv_bn(x, 64, 3, name='entry_flow/conv1_2', train=train, bn=self.bn,
                       padding='EXPLICIT', dtype=self.dtype)
    tap_unit = DECODER_END_POINTS[self.variant].get(self.low_level_stride)
    module_cls = nn.remat(XceptionModule) if self.remat else XceptionModule
    low_level = None
    for scope, depths, skip, act_in_sep, stride, rate, unit_rates in unit_schedule(
        self.variant, self.output_stride, self.multi_grid):
      x, tap = module_cls(depths, skip, act_in_sep, stride, rate, unit_rates, train, self.bn,
                          self.depthwise_impl, self.dtype, name=f'{scope}/xception_module')(x)
      if scope == tap_unit:
        low_level = tap
    return {'out': x, 'low_level': low_level}
