"""Building blocks shared by every DeepLab backbone and head.

Names mirror the official TF-slim scopes so that a parameter's '/'-joined path is its TF checkpoint name:
a convolution named `S` holds `S/kernel` (TF `S/weights` or `S/depthwise_weights`) and its BatchNorm is the
sibling module `S/BatchNorm` (TF `S/BatchNorm/{gamma,beta,moving_mean,moving_variance}`). The helpers below
are plain functions that create Flax modules inside the caller's compact method, so they add no extra level.
"""
import dataclasses
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deeplab_jax.models import conv_ops

Array = jax.Array
DEPTHWISE_IMPLS = ('auto', 'grouped', 'shifted')


@dataclasses.dataclass(frozen=True)
class BNConfig:
  """BatchNorm decay and epsilon of one part of the network (backbones and heads differ)."""
  decay: float
  epsilon: float


def scale_dimension(dim: int, scale: float) -> int:
  """The official DeepLab size rule `int((dim - 1) * scale + 1)` (crop sizes are 16k+1)."""
  return int((float(dim) - 1.0) * scale + 1.0)


def _align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] bilinear interpolation weights with align_corners=True semantics."""
  weights = np.zeros((out_size, in_size), np.float32)
  if in_size == 1 or out_size == 1:
    weights[:, 0] = 1.0
    return weights
  scale = (in_size - 1) / (out_size - 1)
  positions = np.arange(out_size, dtype=np.float64) * scale
  lower = np.clip(np.floor(positions).astype(np.int64), 0, in_size - 1)
  upper = np.minimum(lower + 1, in_size - 1)
  frac = (positions - lower).astype(np.float32)
  rows = np.arange(out_size)
  np.add.at(weights, (rows, lower), 1.0 - frac)
  np.add.at(weights, (rows, upper), frac)
  return weights


def resize_bilinear(x: Array, size: Sequence[int]) -> Array:
  """Bilinear resize of `[B, H, W, C]` to `[B, size[0], size[1], C]`, TF `align_corners=True` semantics.

  Written as two small matrix products with interpolation weights built at trace time, which is exact,
  differentiable and fast on every backend (the official graph uses `resize_bilinear(align_corners=True)`
  everywhere; `jax.image.resize` uses half-pixel centres instead).
  """
  out_h, out_w = int(size[0]), int(size[1])
  if (x.shape[1], x.shape[2]) == (out_h, out_w):
    return x
  wh = jnp.asarray(_align_corners_matrix(x.shape[1], out_h), x.dtype)
  ww = jnp.asarray(_align_corners_matrix(x.shape[2], out_w), x.dtype)
  x = jnp.einsum('oh,bhwc->bowc', wh, x)
  return jnp.einsum('pw,bowc->bopc', ww, x)


def atrous_schedule(strides: Sequence[int], output_stride: Optional[int], start_stride: int = 1,
                    network: str = 'this backbone') -> list:
  """(stride, rate) of each unit after the atrous conversion (official `stack_blocks_dense`).

  Units run at their nominal stride until the running stride reaches `output_stride`; from then on they run
  at stride 1 and the rate is multiplied by each stride they skip, so the receptive field is kept and the
  parameters are unchanged. The rate returned is the one in effect at the unit (before its own stride is
  folded in).

  Args:
    strides: nominal stride of every unit, in order.
    output_stride: the target stride of the last feature map, or None for no conversion.
    start_stride: the running stride before the first unit (e.g. 2 after a strided stem).
    network: the backbone's name, for errors.

  Returns:
    `[(stride, rate)]`, one pair per unit.

  Raises:
    ValueError: if `output_stride` is not the running stride at some unit boundary.
  """
  current, rate, schedule = start_stride, 1, []
  for stride in strides:
    if output_stride is not None and current > output_stride:
      break
    if output_stride is not None and current == output_stride:
      schedule.append((1, rate))
      rate *= stride
    else:
      schedule.append((stride, 1))
      current *= stride
  if output_stride is not None and current != output_stride:
    reachable = [start_stride]
    for stride in strides:
      reachable.append(reachable[-1] * stride)
    raise ValueError(f'output_stride={output_stride} cannot be reached by {network}; allowed: '
                     f'{sorted(set(reachable))}.')
  return schedule


def explicit_pads(kernel_size: int, rate: int = 1) -> Tuple[int, int]:
  """(before, after) padding of TF `conv2d_same`/`fixed_padding` for a strided 'VALID' conv.

  pad_total = k_eff - 1 with k_eff = k + (k - 1)(rate - 1); pad_beg = pad_total // 2. TF 'SAME' would put the
  odd pixel at the end instead, which shifts features by one pixel on even input sizes.
  """
  pad_total = kernel_size + (kernel_size - 1) * (rate - 1) - 1
  return pad_total // 2, pad_total - pad_total // 2


def resolve_depthwise_impl(impl: str) -> str:
  """'auto' -> 'shifted' on CPU (XLA:CPU grouped convs are 12-45x slower), 'grouped' elsewhere."""
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(f'config.model.depthwise_impl={impl!r} is not one of {DEPTHWISE_IMPLS}.')
  if impl == 'auto':
    return 'shifted' if jax.default_backend() == 'cpu' else 'grouped'
  return impl


def _conv_padding(kernel_size: int, stride: int, rate: int, padding: str):
  """Padding argument for lax/flax convs: 'SAME' (TF semantics) or explicit symmetric for `conv2d_same`."""
  if padding == 'SAME' or stride == 1:
    # TF SAME; at stride 1 it is symmetric for odd effective kernels, as `conv2d_same` is.
    return 'SAME'
  if padding == 'EXPLICIT':
    pads = explicit_pads(kernel_size, rate)
    return (pads, pads)
  raise ValueError(f'Unknown padding {padding!r}; expected SAME or EXPLICIT.')


class ShiftedDepthwiseConv(nn.Module):
  """Depthwise conv as k*k shifted multiply-adds over a padded input: the fast formulation on XLA:CPU.

  Holds exactly the parameter `nn.Conv(..., feature_group_count=C)` holds (`kernel` `[kh, kw, 1, C]`), so
  the two implementations are interchangeable on the same variables. Its backward pass recomputes the
  shifted slices instead of keeping them (`conv_ops.depthwise_conv2d_shifted`).
  """
  kernel_size: int
  strides: int = 1
  rate: int = 1
  padding: Any = 'SAME'
  kernel_init: Callable = nn.initializers.truncated_normal(0.33)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (k, k, 1, x.shape[-1]), jnp.float32)
    return conv_ops.depthwise_conv2d_shifted(x.astype(self.dtype), kernel.astype(self.dtype),
                                             stride=self.strides, rate=self.rate, padding=self.padding)


class Conv(nn.Module):
  """2-D convolution with the parameters of `nn.Conv` (`kernel` `[k, k, C, O]`, optional `bias` `[O]`).

  Computed by `conv_ops.conv2d`: XLA's convolution, with gradients written as matrix products on CPU.
  """
  features: int
  kernel_size: int
  strides: int = 1
  rate: int = 1
  padding: Any = 'SAME'
  use_bias: bool = False
  kernel_init: Callable = nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
    y = conv_ops.conv2d(x.astype(self.dtype), kernel.astype(self.dtype), stride=self.strides,
                        rate=self.rate, padding=self.padding)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
    return y


def conv(x: Array, features: int, kernel_size: int, *, name: str, stride: int = 1, rate: int = 1,
         padding: str = 'SAME', use_bias: bool = False, kernel_init: Optional[Callable] = None,
         dtype: Any = jnp.float32) -> Array:
  """A plain 2-D convolution named `name` (TF `name/weights`).

  padding: 'SAME' (TF semantics, also at stride > 1, as MobileNetV2) or 'EXPLICIT' (TF `conv2d_same`:
  symmetric padding then VALID when strided; same as SAME at stride 1).
  """
  init = {} if kernel_init is None else {'kernel_init': kernel_init}  # else Conv's He-normal default
  return Conv(features, kernel_size, stride, rate, _conv_padding(kernel_size, stride, rate, padding),
              use_bias, dtype=dtype, name=name, **init)(x)


def depthwise_conv(x: Array, kernel_size: int, *, name: str, stride: int = 1, rate: int = 1,
                   padding: str = 'SAME', impl: str = 'auto', dtype: Any = jnp.float32,
                   kernel_init: Callable = nn.initializers.truncated_normal(0.33)) -> Array:
  """Depthwise conv named `name`: `feature_group_count=C` with `kernel_dilation` (atrous) or shifted sums."""
  pad = _conv_padding(kernel_size, stride, rate, padding)
  if resolve_depthwise_impl(impl) == 'grouped':
    channels = x.shape[-1]
    return nn.Conv(
        channels, (kernel_size, kernel_size), strides=(stride, stride), padding=pad,
        kernel_dilation=(rate, rate), feature_group_count=channels, use_bias=False,
        kernel_init=kernel_init, dtype=dtype, param_dtype=jnp.float32, name=name)(x)
  return ShiftedDepthwiseConv(kernel_size, stride, rate, pad, kernel_init, dtype, name=name)(x)


# nn.BatchNorm under jax.checkpoint: the same variables and values; its backward pass recomputes the
# normalisation from the input instead of reading a kept copy (see `recompute_batch_norm`).
_RecomputedBatchNorm = nn.remat(nn.BatchNorm)


def recompute_batch_norm() -> bool:
  """True where a training BatchNorm's backward pass recomputes `x - mean` from `x`: on CPU.

  Differentiated as written, BatchNorm keeps its centred input `x - mean` for the backward pass: XLA:CPU
  writes it in the forward pass as one more full-size array per BatchNorm and keeps it until the backward
  pass. Under `jax.checkpoint` the backward pass recomputes it inside the fusions that read `x` anyway (no
  compiler option needed, unlike `config.model.remat`). Measured on a 2-core CPU, train step batch 2 at
  513x513: Xception-65 V3+ 7.64 -> 7.24 s, XLA temporaries 5.20 -> 3.66 GB; ResNet-101 V3 OS8 25.0 -> 23.4 s,
  7.71 -> 5.69 GB. Accelerators keep plain BatchNorm (not measured there).
  """
  return jax.default_backend() == 'cpu'


def batch_norm(x: Array, *, name: str, train: bool, decay: float, epsilon: float,
               dtype: Any = jnp.float32) -> Array:
  """BatchNorm named `name` (TF `.../BatchNorm`); over a batch sharded on devices it is cross-device."""
  module = _RecomputedBatchNorm if train and recompute_batch_norm() else nn.BatchNorm
  return module(
      use_running_average=not train, momentum=decay, epsilon=epsilon, dtype=dtype,
      param_dtype=jnp.float32, name=name)(x)


def conv_bn(x: Array, features: int, kernel_size: int, *, name: str, train: bool, bn: BNConfig,
            stride: int = 1, rate: int = 1, padding: str = 'SAME',
            activation: Optional[Callable] = nn.relu, dtype: Any = jnp.float32) -> Array:
  """conv -> BatchNorm -> activation, TF-slim `conv2d(normalizer_fn=batch_norm)` under scope `name`."""
  x = conv(x, features, kernel_size, name=name, stride=stride, rate=rate, padding=padding, dtype=dtype)
  x = batch_norm(x, name=f'{name}/BatchNorm', train=train, decay=bn.decay, epsilon=bn.epsilon,
                 dtype=dtype)
  return activation(x) if activation is not None else x


def separable_conv_bn(x: Array, features: int, kernel_size: int, *, name: str, train: bool,
                      bn: BNConfig, stride: int = 1, rate: int = 1, padding: str = 'SAME',
                      depthwise_activation: Optional[Callable] = nn.relu,
                      pointwise_activation: Optional[Callable] = nn.relu, impl: str = 'auto',
                      dtype: Any = jnp.float32) -> Array:
  """Atrous separable conv: depthwise -> BN -> act -> pointwise 1x1 -> BN -> act.

  Scopes `{name}_depthwise` and `{name}_pointwise`, as official `split_separable_conv2d`.
  """
  x = depthwise_conv(x, kernel_size, name=f'{name}_depthwise', stride=stride, rate=rate,
                     padding=padding, impl=impl, dtype=dtype)
  x = batch_norm(x, name=f'{name}_depthwise/BatchNorm', train=train, decay=bn.decay,
                 epsilon=bn.epsilon, dtype=dtype)
  if depthwise_activation is not None:
    x = depthwise_activation(x)
  return conv_bn(x, features, 1, name=f'{name}_pointwise', train=train, bn=bn,
                 activation=pointwise_activation, dtype=dtype)


def residual_relu(x: Array) -> Array:
  """`relu(x)` of a residual sum, as `x * (x > 0)`: the same values (bar the sign of a zero) and gradient.

  A residual unit's output feeds the next unit's convolution and its shortcut sum. Written as `max(x, 0)`,
  an op XLA treats as unary and so duplicates freely, XLA:CPU fuses each unit's output into the next
  unit's sum instead of reading it back, and so down the chain: ResNet-101's later units recomputed the
  sums of up to nine earlier units (0.9 s of a 3.7 s ResNet-101 OS8 inference). A product of two full-size
  operands is not duplicated: each output is computed once.
  """
  return x * (x > 0).astype(x.dtype)


relu6 = jax.nn.relu6


def max_pool(x: Array, window: int, stride: int, padding) -> Array:
  """Max pooling; padding 'SAME' or explicit pairs (pads with -inf)."""
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding=padding)
