"""Convolution operators whose backward passes run at matrix-product speed on XLA:CPU.

XLA:CPU computes the filter gradient of a convolution (`conv_general_dilated`'s transpose with respect to
the kernel) at a fraction of its matrix-product speed: measured on a 2-core x86 VM, a 1x1 conv 728->728 on
`[2, 65, 65, 728]` takes 0.86 s for the filter gradient but 0.055 s as the one matrix product it is, and a
3x3 conv 512->512 1.17 s versus 0.36 s as nine. So on CPU the gradients here are written as what they are:

- filter gradient of a k x k conv: for every tap (i, j), `slice_ij(x_padded)^T @ dy` over the batch and
  pixels, a `[C_in, B*H*W] @ [B*H*W, C_out]` product (the slice is the input the tap reads, strided as the
  conv is);
- a 1x1 conv (forward, input and filter gradients) is a matrix product over channels;
- the input gradient of a k x k conv stays XLA's transposed convolution (it runs at forward speed).

The choice is made per platform at lowering time (`lax.platform_dependent`), so an accelerator lowers
XLA's own convolution and its autodiff gradients exactly as before, and one exported artefact carries both.
The values are the same convolution and the same gradients as autodiff's (tested to 1e-5 in
`tests/conv_ops_test.py`, with stride, dilation and padding variants).

The depthwise convolution as k*k shifted multiply-adds (the fast CPU forward; XLA:CPU grouped convs are
12-45x slower) gets its own backward too: autodiff would keep every shifted slice of the input alive for the
backward pass; this one keeps the input only and recomputes the slices. Its filter gradient is one pass of a
native kernel on CPU where one could be built (`cpu_kernels`), else k*k XLA reductions.
"""
import functools
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from deeplab_jax.models import cpu_kernels

Array = jax.Array
Pads = Tuple[Tuple[int, int], Tuple[int, int]]
_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def explicit_padding(spatial_shape: Sequence[int], kernel_size: int, stride: int, rate: int,
                     padding) -> Pads:
  """'SAME' / 'VALID' / explicit pairs -> explicit `((top, bottom), (left, right))` (TF 'SAME' rule)."""
  if isinstance(padding, str):
    k_eff = kernel_size + (kernel_size - 1) * (rate - 1)
    pads = lax.padtype_to_pads(tuple(spatial_shape), (k_eff, k_eff), (stride, stride), padding)
  else:
    pads = padding
  return tuple((int(lo), int(hi)) for lo, hi in pads)


def _output_size(size: int, pads: Tuple[int, int], k_eff: int, stride: int) -> int:
  return (size + pads[0] + pads[1] - k_eff) // stride + 1


def _tap_slice(x_padded: Array, i: int, j: int, rate: int, stride: int, out_h: int, out_w: int) -> Array:
  """The `[B, out_h, out_w, C]` input that kernel tap (i, j) reads, from the padded input."""
  return lax.slice(x_padded, (0, i * rate, j * rate, 0),
                   (x_padded.shape[0], i * rate + (out_h - 1) * stride + 1,
                    j * rate + (out_w - 1) * stride + 1, x_padded.shape[3]),
                   (1, stride, stride, 1))


def _untap(values: Array, i: int, j: int, rate: int, stride: int, padded_shape: Sequence[int]) -> Array:
  """Transpose of `_tap_slice`: `[B, oh, ow, C]` -> the padded input's shape, zero where the tap did not read.

  Value (p, q) lands on padded pixel (p * stride + i * rate, q * stride + j * rate). The pads are all
  non-negative, so XLA fuses a sum of these into one loop (negative ones, i.e. cropping here, make it
  materialise each tap's padded copy); callers crop the padding once, after summing.
  """
  config = [(0, 0, 0)]
  for axis, tap in ((1, i), (2, j)):
    filled = (values.shape[axis] - 1) * stride + 1
    config.append((tap * rate, padded_shape[axis] - tap * rate - filled, stride - 1))
  config.append((0, 0, 0))
  return lax.pad(values, jnp.zeros((), values.dtype), config)


def _crop(x_padded: Array, pads: Pads, shape: Sequence[int]) -> Array:
  return lax.slice(x_padded, (0, pads[0][0], pads[1][0], 0),
                   (shape[0], pads[0][0] + shape[1], pads[1][0] + shape[2], shape[3]))


def _matmul_channels(x: Array, w: Array) -> Array:
  """`[..., C] @ [C, O]`."""
  return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _pixels_outer(a: Array, b: Array) -> Array:
  """`sum over B, H, W of a[..., :, None] * b[..., None, :]`: `[B, H, W, C] x [B, H, W, O] -> [C, O]`."""
  return lax.dot_general(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), (((0,), (0,)), ((), ())))


def _with_backward(forward, grads):
  """`forward(x, kernel, stride, rate, pads)` with the backward pass `grads(x, kernel, dy, **static)`.

  Only the inputs are kept for the backward pass; the gradients come back in the inputs' dtypes.
  """
  @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
  def op(x, kernel, stride, rate, pads):
    return forward(x, kernel, stride, rate, pads)

  def op_fwd(x, kernel, stride, rate, pads):
    return forward(x, kernel, stride, rate, pads), (x, kernel)

  def op_bwd(stride, rate, pads, residuals, dy):
    x, kernel = residuals
    dx, dkernel = grads(x, kernel, dy, stride=stride, rate=rate, pads=pads)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)

  op.defvjp(op_fwd, op_bwd)
  return op


# Plain 2-D convolution.


def _xla_conv(x: Array, kernel: Array, stride: int, rate: int, pads: Pads) -> Array:
  return lax.conv_general_dilated(x, kernel, (stride, stride), pads, rhs_dilation=(rate, rate),
                                  dimension_numbers=_DIMENSIONS)


def _is_pointwise(kernel: Array, pads: Pads) -> bool:
  return kernel.shape[0] == 1 and kernel.shape[1] == 1 and pads == ((0, 0), (0, 0))


# Atrous convs whose taps mostly read padding (ASPP rates 12/24/36 on a 65x65 map) run as one matrix product
# per tap over the region where the tap reads the input: 3x3 2048->256 at 65x65, rate 36: 0.71 s as XLA's
# dilated conv, 0.15 s this way (rate 12: 0.45 s vs 0.28 s). On dense maps XLA's conv is faster (rate 2: 32 ms
# vs 52 ms), so the per-tap form is used below this fraction of the dense work only.
_TAP_FORM_MAX_WORK = 0.85


def _tap_regions(x_shape, kernel_shape, rate: int, pads: Pads, out_shape):
  """For a stride-1 conv: per tap (i, j), the output rows/cols `(p0, p1, q0, q1)` whose input is not padding.

  Output pixel (p, q) reads input pixel (p + i * rate - top, q + j * rate - left) through tap (i, j).
  Taps that read padding only are left out.
  """
  regions = []
  for i in range(kernel_shape[0]):
    for j in range(kernel_shape[1]):
      off_h, off_w = i * rate - pads[0][0], j * rate - pads[1][0]
      p0, p1 = max(0, -off_h), min(out_shape[1], x_shape[1] - off_h)
      q0, q1 = max(0, -off_w), min(out_shape[2], x_shape[2] - off_w)
      if p1 > p0 and q1 > q0:
        regions.append((i, j, off_h, off_w, p0, p1, q0, q1))
  return regions


def _use_tap_form(x_shape, kernel_shape, stride: int, rate: int, pads: Pads, out_shape) -> bool:
  if stride != 1 or rate == 1:
    return False
  work = sum((p1 - p0) * (q1 - q0) for *_, p0, p1, q0, q1 in
             _tap_regions(x_shape, kernel_shape, rate, pads, out_shape))
  return work < _TAP_FORM_MAX_WORK * kernel_shape[0] * kernel_shape[1] * out_shape[1] * out_shape[2]


def _place(values: Array, p0: int, q0: int, shape) -> Array:
  """`values` placed from row/col (p0, q0) in zeros of `shape` (non-negative pads: sums of these fuse)."""
  return lax.pad(values, jnp.zeros((), values.dtype),
                 [(0, 0, 0), (p0, shape[1] - p0 - values.shape[1], 0),
                  (q0, shape[2] - q0 - values.shape[2], 0), (0, 0, 0)])


def _tap_form_conv(x: Array, kernel: Array, rate: int, pads: Pads, out_shape) -> Array:
  out = None
  for i, j, off_h, off_w, p0, p1, q0, q1 in _tap_regions(x.shape, kernel.shape, rate, pads, out_shape):
    term = _place(_matmul_channels(x[:, p0 + off_h:p1 + off_h, q0 + off_w:q1 + off_w], kernel[i, j]),
                  p0, q0, out_shape)
    out = term if out is None else out + term
  return out


def _conv_output_shape(x_shape, kernel_shape, stride: int, rate: int, pads: Pads):
  k_eff = [k + (k - 1) * (rate - 1) for k in kernel_shape[:2]]
  return (x_shape[0], _output_size(x_shape[1], pads[0], k_eff[0], stride),
          _output_size(x_shape[2], pads[1], k_eff[1], stride), kernel_shape[3])


def _cpu_conv(x: Array, kernel: Array, stride: int, rate: int, pads: Pads) -> Array:
  if _is_pointwise(kernel, pads):
    return _matmul_channels(x[:, ::stride, ::stride, :], kernel[0, 0])
  out_shape = _conv_output_shape(x.shape, kernel.shape, stride, rate, pads)
  if _use_tap_form(x.shape, kernel.shape, stride, rate, pads, out_shape):
    return _tap_form_conv(x, kernel, rate, pads, out_shape)
  return _xla_conv(x, kernel, stride, rate, pads)


def _forward(x, kernel, stride, rate, pads):
  return lax.platform_dependent(
      x, kernel, cpu=functools.partial(_cpu_conv, stride=stride, rate=rate, pads=pads),
      default=functools.partial(_xla_conv, stride=stride, rate=rate, pads=pads))


def _xla_conv_grads(x, kernel, dy, *, stride, rate, pads):
  _, vjp = jax.vjp(functools.partial(_xla_conv, stride=stride, rate=rate, pads=pads), x, kernel)
  return vjp(dy)


def cpu_conv_grads(x: Array, kernel: Array, dy: Array, *, stride: int, rate: int, pads: Pads):
  """(dx, dkernel) of `conv2d` as matrix products (the CPU backward; public for tests and benchmarks).

  In the inputs' dtypes, as autodiff's gradients (the other branch of `_platform_grads`) are; the filter
  gradient is summed in float32.
  """
  k_h, k_w = kernel.shape[:2]
  out_h, out_w = dy.shape[1:3]
  if _is_pointwise(kernel, pads):
    dx_taken = _matmul_channels(dy, kernel[0, 0].T)
    dx = _crop(_untap(dx_taken, 0, 0, rate, stride, x.shape), pads, x.shape) if stride > 1 else dx_taken
    dkernel = _pixels_outer(x[:, ::stride, ::stride, :], dy)[None, None]
  elif _use_tap_form(x.shape, kernel.shape, stride, rate, pads, dy.shape):
    dx, dkernel = None, jnp.zeros(kernel.shape, jnp.float32)
    for i, j, off_h, off_w, p0, p1, q0, q1 in _tap_regions(x.shape, kernel.shape, rate, pads, dy.shape):
      region = dy[:, p0:p1, q0:q1]
      term = _place(_matmul_channels(region, kernel[i, j].T), p0 + off_h, q0 + off_w, x.shape)
      dx = term if dx is None else dx + term
      dkernel = dkernel.at[i, j].set(
          _pixels_outer(x[:, p0 + off_h:p1 + off_h, q0 + off_w:q1 + off_w], region).astype(jnp.float32))
  else:
    _, input_vjp = jax.vjp(lambda v: _xla_conv(v, kernel, stride, rate, pads), x)
    (dx,) = input_vjp(dy)
    x_padded = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    window = ((out_h - 1) * stride + 1, (out_w - 1) * stride + 1)

    def tap(t, dkernel):
      # One tap per iteration, so only one tap's input slice is alive at a time: unrolled, XLA kept the
      # slices of many convs alive together (ResNet-101 OS8 train step: +3 GB of temporaries).
      read = lax.dynamic_slice(x_padded, (0, (t // k_w) * rate, (t % k_w) * rate, 0),
                               (x.shape[0], *window, x.shape[3]))
      return lax.dynamic_update_index_in_dim(
          dkernel, _pixels_outer(read[:, ::stride, ::stride], dy).astype(jnp.float32), t, 0)

    dkernel = lax.fori_loop(0, k_h * k_w, tap, jnp.zeros((k_h * k_w, *kernel.shape[2:]), jnp.float32))
  return dx.astype(x.dtype), dkernel.reshape(kernel.shape).astype(kernel.dtype)


def _platform_grads(x, kernel, dy, *, stride, rate, pads):
  kw = dict(stride=stride, rate=rate, pads=pads)
  return lax.platform_dependent(x, kernel, dy, cpu=functools.partial(cpu_conv_grads, **kw),
                                default=functools.partial(_xla_conv_grads, **kw))


_conv2d = _with_backward(_forward, _platform_grads)


def conv2d(x: Array, kernel: Array, *, stride: int = 1, rate: int = 1, padding='SAME') -> Array:
  """2-D convolution (cross-correlation) `[B, H, W, C] x [k, k, C, O] -> [B, H', W', O]`.

  Args:
    x: `[B, H, W, C]` input.
    kernel: `[k, k, C, O]` filter (HWIO).
    stride: spatial stride.
    rate: atrous rate (kernel dilation).
    padding: 'SAME' (TF semantics), 'VALID' or explicit `((top, bottom), (left, right))`.
  """
  pads = explicit_padding(x.shape[1:3], kernel.shape[0], stride, rate, padding)
  return _conv2d(x, kernel, stride, rate, pads)


# Depthwise convolution as shifted multiply-adds.


def _depthwise_over_padded(x_padded: Array, kernel: Array, rate: int, stride: int, out_h: int,
                           out_w: int) -> Array:
  """`[B, out_h, out_w, C]`: the sum over taps of each tap's strided slice of `x_padded` times its weights."""
  out = None
  for i in range(kernel.shape[0]):
    for j in range(kernel.shape[1]):
      term = _tap_slice(x_padded, i, j, rate, stride, out_h, out_w) * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def _depthwise_over_padded_transpose(dy: Array, kernel: Array, rate: int, stride: int,
                                     padded_shape: Sequence[int]) -> Array:
  """Transpose of `_depthwise_over_padded` in `x_padded`: each tap's `dy * w` put back where the tap read."""
  dx_padded = None
  for i in range(kernel.shape[0]):
    for j in range(kernel.shape[1]):
      term = _untap(dy * kernel[i, j, 0], i, j, rate, stride, padded_shape)
      dx_padded = term if dx_padded is None else dx_padded + term
  return dx_padded


def _shifted_forward(x, kernel, stride, rate, pads):
  k_h, k_w = kernel.shape[:2]
  out_h = _output_size(x.shape[1], pads[0], k_h + (k_h - 1) * (rate - 1), stride)
  out_w = _output_size(x.shape[2], pads[1], k_w + (k_w - 1) * (rate - 1), stride)
  x_padded = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  return _depthwise_over_padded(x_padded, kernel, rate, stride, out_h, out_w)


# The padded-frame form of the depthwise filter gradient reduces over the whole padded input: used up to this
# ratio of padded to output area (rate 6 on 33x33: 1.86, faster; rate 12: 2.98, slower than by rows).
_DEPTHWISE_PADDED_FORM_MAX_AREA = 2.0


def uses_padded_depthwise_form(x_shape, kernel_size: int, stride: int, rate: int, pads: Pads) -> bool:
  """Whether `xla_depthwise_filter_grad` sums over the padded frame (else by rows)."""
  k_eff = kernel_size + (kernel_size - 1) * (rate - 1)
  out_h, out_w = (_output_size(x_shape[i + 1], pads[i], k_eff, stride) for i in (0, 1))
  padded = (x_shape[1] + sum(pads[0])) * (x_shape[2] + sum(pads[1]))
  return stride == 1 and padded <= _DEPTHWISE_PADDED_FORM_MAX_AREA * out_h * out_w


def shifted_depthwise_grads(x: Array, kernel: Array, dy: Array, *, stride: int, rate: int, pads: Pads):
  """(dx, dkernel) of `depthwise_conv2d_shifted`, recomputing the taps' slices from `x`.

  dx is one fused loop (each tap's `dy * w` put back where the tap read). dkernel is k*k per-channel sums of
  `tap slice * dy` over the batch and pixels: on CPU, in float32 and where it could be built, one pass of the
  native kernel (`cpu_kernels`, 1.6-3.2x faster than XLA's k*k reductions), else `xla_depthwise_filter_grad`.
  """
  k_h, k_w = kernel.shape[:2]
  # dy (a BatchNorm backward expression here) computed once: otherwise XLA:CPU recomputes it inside the
  # fused dx loop for each of the k*k taps. Xception-65 train step 5.92 -> 5.80 s (6 alternated pairs).
  dy = lax.optimization_barrier(dy)
  x_padded = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  dx_padded = _depthwise_over_padded_transpose(dy, kernel, rate, stride, x_padded.shape)
  # One array, computed once: where dx has several consumers (the decoder's depthwise conv reads a concat,
  # whose gradient is two slices of dx), XLA:CPU otherwise fuses the sum into each consumer and writes the
  # k*k terms out as full-size arrays first (9 x 42 MB at the Xception-65 train step's peak).
  dx = lax.optimization_barrier(_crop(dx_padded, pads, x.shape))
  xla_form = functools.partial(xla_depthwise_filter_grad, kernel_size=(k_h, k_w), stride=stride, rate=rate,
                               pads=pads)
  if x.dtype == dy.dtype == jnp.float32 and cpu_kernels.available():
    native = functools.partial(_native_depthwise_filter_grad, kernel_size=(k_h, k_w), stride=stride,
                               rate=rate)
    dkernel = lax.platform_dependent(x_padded, dy, cpu=native, default=xla_form)
  else:
    dkernel = xla_form(x_padded, dy)
  return dx, dkernel.reshape(kernel.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _native_depthwise_filter_grad(x_padded, dy, kernel_size, stride, rate):
  """`cpu_kernels.depthwise_filter_grad`, made differentiable: a gradient through it can be differentiated."""
  return cpu_kernels.depthwise_filter_grad(x_padded, dy, kernel_size, stride, rate)


def _native_depthwise_filter_grad_fwd(x_padded, dy, kernel_size, stride, rate):
  return _native_depthwise_filter_grad(x_padded, dy, kernel_size, stride, rate), (x_padded, dy)


def _native_depthwise_filter_grad_bwd(kernel_size, stride, rate, residuals, g):
  # Bilinear in (x_padded, dy): each cotangent is the depthwise conv (or its transpose) of the other input
  # with the filter gradient's cotangent `g` as the kernel.
  x_padded, dy = residuals
  g = g.reshape(*kernel_size, 1, g.shape[-1])
  return (_depthwise_over_padded_transpose(dy, g, rate, stride, x_padded.shape),
          _depthwise_over_padded(x_padded, g, rate, stride, *dy.shape[1:3]))


_native_depthwise_filter_grad.defvjp(_native_depthwise_filter_grad_fwd, _native_depthwise_filter_grad_bwd)


def xla_depthwise_filter_grad(x_padded: Array, dy: Array, *, kernel_size: Tuple[int, int], stride: int,
                              rate: int, pads: Pads) -> Array:
  """`[kh * kw, C]` float32 filter gradient of a depthwise conv with XLA's operations (public for tests).

  Written as k*k sums over whole tensors of `tap slice * dy`, XLA:CPU materialises every tap's slice of the
  input and reads it back. At stride 1 the same sum is taken over the padded input times `dy` placed where
  the tap read (`_untap`, a pad that fuses into the reduction): nothing is materialised. Where the padded
  frame is much larger than the output (ASPP's rates 12 and 18 on a 33x33 map) or the conv is strided (the
  pad would interleave zeros), the sums run one output row at a time instead, where the slices stay in
  cache. Measured on a 2-core x86 VM, dkernel of a 3x3 depthwise conv: `[2, 33, 33, 728]` 10.0 ms by rows,
  5.0 ms padded; `[2, 129, 129, 256]` 74 ms, 44 ms; `[2, 257, 257, 64]` 75 ms, 34 ms; rate 12 on `[2, 33,
  33, 2048]` 49 ms by rows, 52 ms padded.
  """
  k_h, k_w = kernel_size
  out_h, out_w = dy.shape[1:3]
  x_shape = (x_padded.shape[0], x_padded.shape[1] - sum(pads[0]), x_padded.shape[2] - sum(pads[1]),
             x_padded.shape[3])
  if uses_padded_depthwise_form(x_shape, k_h, stride, rate, pads):
    return jnp.stack([
        jnp.sum(x_padded * _untap(dy, i, j, rate, stride, x_padded.shape), axis=(0, 1, 2), dtype=jnp.float32)
        for i in range(k_h) for j in range(k_w)])
  rows_read = (k_h - 1) * rate + 1

  def row(n, dkernel):
    x_rows = lax.dynamic_slice_in_dim(x_padded, n * stride, rows_read, axis=1)
    dy_row = lax.dynamic_slice_in_dim(dy, n, 1, axis=1)
    taps = [jnp.sum(_tap_slice(x_rows, i, j, rate, stride, 1, out_w) * dy_row, axis=(0, 1, 2),
                    dtype=jnp.float32)
            for i in range(k_h) for j in range(k_w)]
    return dkernel + jnp.stack(taps)

  return lax.fori_loop(0, out_h, row, jnp.zeros((k_h * k_w, x_padded.shape[-1]), jnp.float32))


_shifted = _with_backward(_shifted_forward, shifted_depthwise_grads)


def depthwise_conv2d_shifted(x: Array, kernel: Array, *, stride: int = 1, rate: int = 1,
                             padding='SAME') -> Array:
  """Depthwise convolution `[B, H, W, C] x [k, k, 1, C]` as k*k shifted multiply-adds.

  The same values as `conv_general_dilated(..., feature_group_count=C)`; fast on XLA:CPU, where grouped
  convolutions are not. `padding` as in `conv2d`.
  """
  pads = explicit_padding(x.shape[1:3], kernel.shape[0], stride, rate, padding)
  return _shifted(x, kernel, stride, rate, pads)
