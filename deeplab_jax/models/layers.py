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
from jax import lax
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


def _convolve(conv: Callable, x, kernel: Array, dtype, **conv_args) -> Array:
  """`conv(x, kernel, **conv_args)` in `dtype`; a `Normalized` `x` is computed by the conv (`feed`)."""
  def compute(value, kernel):
    return conv(value.astype(dtype), kernel.astype(dtype), **conv_args)

  return x.feed(compute, kernel) if isinstance(x, Normalized) else compute(x, kernel)


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
    return _convolve(conv_ops.depthwise_conv2d_shifted, x, kernel, self.dtype, stride=self.strides,
                     rate=self.rate, padding=self.padding)


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
  def __call__(self, x) -> Array:
    k = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
    y = _convolve(conv_ops.conv2d, x, kernel, self.dtype, stride=self.strides, rate=self.rate,
                  padding=self.padding)
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
    x = as_array(x)
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
  """True where a training BatchNorm's output is recomputed in the backward pass, not kept: on CPU.

  Differentiated as written, BatchNorm keeps its centred input `x - mean` for the backward pass, and the
  convolution after it keeps its output, the input of that convolution: XLA:CPU writes and keeps both
  as full-size arrays beside the BatchNorm's input. On CPU, a BatchNorm runs under `jax.checkpoint`
  (`nn.remat(nn.BatchNorm)`), so its backward pass recomputes the centred input in the fusions that read
  `x` anyway; and where a convolution comes next (`batch_norm(defer=True)`: inside separable convs,
  between an Xception unit's separable convs, in ResNet bottlenecks, between the decoder's convs; also the
  relu before an Xception unit, `activate(defer=True)`) the convolution computes the BatchNorm and
  activation itself, recomputing them for its backward pass (`Normalized.feed`; this needs
  `train.cpu_compiler_options`). Measured on a 2-core CPU, Xception-65 V3+ train step batch 2 at 513x513:
  7.64 -> 7.24 s and XLA temporaries 5.20 -> 3.66 GB with the first, 3.65 -> 2.28 GB and about 10% faster
  with the second; ResNet-101 V3 OS8: 25.0 -> 23.4 s, 7.71 -> 5.69 GB, then 5.74 -> 4.84 GB. Accelerators
  keep plain BatchNorm (not measured there).
  """
  return jax.default_backend() == 'cpu'


@dataclasses.dataclass(frozen=True)
class Normalized:
  """A training BatchNorm's output, not yet computed: `activation((z - mean) * mul + bias)` in `dtype`.

  (Or `activation(z)` alone, with `mean`, `mul` and `bias` None: `activate(..., defer=True)`.)

  `batch_norm(..., defer=True)` returns one on CPU (see `recompute_batch_norm`); the next convolution
  computes it inside `jax.checkpoint` (`feed`), so the backward pass recomputes the convolution's input from
  `z`, which the BatchNorm's own backward pass keeps anyway, instead of keeping a second full-size array.
  `value()` computes it as a plain array (what `nn.BatchNorm` and the activation return, the same formula).
  """
  z: Array
  mean: Optional[Array]
  mul: Optional[Array]
  bias: Optional[Array]
  activation: Optional[Callable] = None
  dtype: Any = jnp.float32

  @property
  def shape(self) -> Tuple[int, ...]:
    return self.z.shape

  def with_activation(self, activation: Callable) -> 'Normalized':
    if self.activation is not None:
      raise ValueError(f'This BatchNorm output already has the activation {self.activation}.')
    return dataclasses.replace(self, activation=activation)

  def _compute(self, z: Array, *normalization: Array) -> Array:
    y = z
    if normalization:
      mean, mul, bias = normalization
      y = jnp.asarray((z - mean) * mul + bias, self.dtype)
    return self.activation(y) if self.activation is not None else y

  def _normalization(self) -> Tuple[Array, ...]:
    return () if self.mean is None else (self.mean, self.mul, self.bias)

  def value(self) -> Array:
    return self._compute(self.z, *self._normalization())

  def feed(self, fn: Callable, *args) -> Array:
    """`fn(self.value(), *args)`, with the value recomputed for the backward pass instead of kept.

    XLA:CPU merges the recomputation back into the forward pass unless the step is compiled with
    `train.cpu_compiler_options` (the trainer's step is).
    """
    return jax.checkpoint(lambda z, normalization, *rest: fn(self._compute(z, *normalization), *rest))(
        self.z, self._normalization(), *args)


def as_array(x) -> Array:
  """`x`, computed if it is a `Normalized`."""
  return x.value() if isinstance(x, Normalized) else x


def activate(x, activation: Optional[Callable], *, defer: bool = False, train: bool = False):
  """`activation(x)` of an array, or of a `Normalized` (then computed with it, where it is computed).

  With `defer=True` (for a caller whose next step is a convolution) an array's activation in training on
  CPU is a `Normalized` too, so the convolution's backward pass recomputes it instead of keeping it beside
  `x` (which the activation's own backward pass keeps).
  """
  if activation is None:
    return x
  if isinstance(x, Normalized):
    return x.with_activation(activation)
  if defer and train and recompute_batch_norm():
    return Normalized(x, None, None, None, activation, x.dtype)
  return activation(x)


class BatchNormStatistics(nn.Module):
  """A training `nn.BatchNorm` that returns its output as `Normalized` instead of computing it.

  The same variables (`scale`, `bias`; `batch_stats` `mean`, `var`), batch statistics (float32, variance as
  `E[x^2] - E[x]^2` clipped at 0), running-average update and normalisation formula as `nn.BatchNorm`.
  """
  momentum: float
  epsilon: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Normalized:
    features = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean', lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable('batch_stats', 'var', lambda s: jnp.ones(s, jnp.float32), features)
    axes = tuple(range(x.ndim - 1))
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = x32.mean(axes)
    var = jnp.maximum(0.0, jnp.square(x32).mean(axes) - jnp.square(mean))
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    mul = lax.rsqrt(var + self.epsilon) * self.param('scale', nn.initializers.ones, features, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, features, jnp.float32)
    return Normalized(x, mean, mul, bias, dtype=self.dtype)


def batch_norm(x: Array, *, name: str, train: bool, decay: float, epsilon: float,
               dtype: Any = jnp.float32, defer: bool = False):
  """BatchNorm named `name` (TF `.../BatchNorm`); over a batch sharded on devices it is cross-device.

  With `defer=True`, a training BatchNorm on CPU returns `Normalized` (for a convolution to compute,
  `recompute_batch_norm`); elsewhere, and with `defer=False`, an array.
  """
  if train and recompute_batch_norm():
    if defer:
      return BatchNormStatistics(decay, epsilon, dtype, name=name)(x)
    module = _RecomputedBatchNorm
  else:
    module = nn.BatchNorm
  return module(
      use_running_average=not train, momentum=decay, epsilon=epsilon, dtype=dtype,
      param_dtype=jnp.float32, name=name)(x)


def conv_bn(x, features: int, kernel_size: int, *, name: str, train: bool, bn: BNConfig,
            stride: int = 1, rate: int = 1, padding: str = 'SAME',
            activation: Optional[Callable] = nn.relu, dtype: Any = jnp.float32, defer_output: bool = False):
  """conv -> BatchNorm -> activation, TF-slim `conv2d(normalizer_fn=batch_norm)` under scope `name`.

  `x` may be a `Normalized`; `defer_output=True` returns one where `batch_norm(defer=True)` does (for a
  caller whose next step is a convolution).
  """
  x = conv(x, features, kernel_size, name=name, stride=stride, rate=rate, padding=padding, dtype=dtype)
  x = batch_norm(x, name=f'{name}/BatchNorm', train=train, decay=bn.decay, epsilon=bn.epsilon,
                 dtype=dtype, defer=defer_output)
  return activate(x, activation)


def separable_conv_bn(x, features: int, kernel_size: int, *, name: str, train: bool,
                      bn: BNConfig, stride: int = 1, rate: int = 1, padding: str = 'SAME',
                      depthwise_activation: Optional[Callable] = nn.relu,
                      pointwise_activation: Optional[Callable] = nn.relu, impl: str = 'auto',
                      dtype: Any = jnp.float32, defer_output: bool = False):
  """Atrous separable conv: depthwise -> BN -> act -> pointwise 1x1 -> BN -> act.

  Scopes `{name}_depthwise` and `{name}_pointwise`, as official `split_separable_conv2d`. `x` and the
  output as in `conv_bn` (the depthwise BatchNorm is always deferred to the pointwise conv).
  """
  x = depthwise_conv(x, kernel_size, name=f'{name}_depthwise', stride=stride, rate=rate,
                     padding=padding, impl=impl, dtype=dtype)
  x = batch_norm(x, name=f'{name}_depthwise/BatchNorm', train=train, decay=bn.decay,
                 epsilon=bn.epsilon, dtype=dtype, defer=True)
  x = activate(x, depthwise_activation)
  return conv_bn(
      x, features, 1, name=f'{name}_pointwise', train=train, bn=bn, activation=pointwise_activation,
      dtype=dtype, defer_output=defer_output)


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
