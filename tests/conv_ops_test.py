"""The CPU convolution backward passes equal XLA's autodiff gradients (stride, dilation, padding variants)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from deeplab_jax.models import conv_ops

# (kernel, stride, rate, padding, input size): 1x1 as matmuls (also strided, as the shortcut convs), k x k
# with atrous rates, TF SAME on odd/even sizes, the explicit `conv2d_same` pads of strided convs, VALID.
# Atrous convs on small maps take the per-tap matmul form (rate 6 on 5 pixels: taps reading padding only
# are skipped), on larger ones XLA's dilated conv (rate 2 on 33 pixels).
CASES = [
    (1, 1, 1, 'SAME', 9),
    (1, 2, 1, 'SAME', 9),
    (1, 2, 1, 'VALID', 8),
    (3, 1, 1, 'SAME', 9),
    (3, 1, 2, 'SAME', 9),
    (3, 1, 4, 'SAME', 10),
    (3, 2, 1, 'SAME', 10),
    (3, 2, 1, ((1, 1), (1, 1)), 9),
    (3, 2, 2, ((2, 2), (2, 2)), 10),
    (3, 1, 1, 'VALID', 7),
    (7, 2, 1, ((3, 3), (3, 3)), 11),
    (2, 1, 3, ((1, 2), (2, 1)), 8),
    (3, 1, 6, 'SAME', 5),
    (3, 1, 2, 'SAME', 33),
]


def test_both_atrous_forms_are_covered():
  def form(rate, size):
    pads = conv_ops.explicit_padding((size, size + 1), 3, 1, rate, 'SAME')
    return conv_ops._use_tap_form((2, size, size + 1, 4), (3, 3, 4, 6), 1, rate, pads, (2, size, size + 1, 6))

  assert form(6, 5) and form(4, 10) and form(3, 8)
  assert not form(2, 33) and not form(1, 9)


def test_both_depthwise_filter_gradient_forms_are_covered():
  """The depthwise cases below reach the padded-frame filter gradient and the one taken by rows."""
  forms = set()
  for k, stride, rate, padding, size in CASES:
    if k > 1:
      pads = conv_ops.explicit_padding((size, size + 1), k, stride, rate, padding)
      forms.add(conv_ops.uses_padded_depthwise_form((2, size, size + 1, 5), k, stride, rate, pads))
  assert forms == {True, False}
  # Xception-65 at 513, OS16: stride-1 layers take the padded form, ASPP's rate 12 and strided layers rows.
  same = lambda size, stride, rate: conv_ops.explicit_padding((size, size), 3, stride, rate, 'SAME')
  assert conv_ops.uses_padded_depthwise_form((2, 33, 33, 728), 3, 1, 6, same(33, 1, 6))
  assert not conv_ops.uses_padded_depthwise_form((2, 33, 33, 728), 3, 1, 12, same(33, 1, 12))
  assert not conv_ops.uses_padded_depthwise_form((2, 129, 129, 256), 3, 2, 1, same(129, 2, 1))


def _xla_conv(x, kernel, stride, rate, padding):
  return lax.conv_general_dilated(x, kernel, (stride, stride), padding, rhs_dilation=(rate, rate),
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                  precision=lax.Precision.HIGHEST)


def _assert_close(got, expected):
  """Equal to 1e-5 relative or 1e-5 of the largest magnitude (float32 sums of thousands of N(0, 1) terms)."""
  expected = np.asarray(expected)
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(expected).max())))


def _data(channels, kernel_shape, size, seed=0):
  """`[2, size, size + 1, channels]` input (non-square, to catch swapped axes) and a kernel, both N(0, 1)."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(2, size, size + 1, channels)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
  return x, kernel


@pytest.mark.parametrize('k,stride,rate,padding,size', CASES)
def test_conv2d_values_and_gradients_equal_autodiff(k, stride, rate, padding, size):
  x, kernel = _data(4, (k, k, 4, 6), size)
  reference = functools.partial(_xla_conv, stride=stride, rate=rate, padding=padding)
  ours = functools.partial(conv_ops.conv2d, stride=stride, rate=rate, padding=padding)
  y = reference(x, kernel)
  np.testing.assert_allclose(ours(x, kernel), y, atol=1e-5, rtol=1e-5)
  dy = jnp.asarray(np.random.default_rng(1).normal(size=y.shape), jnp.float32)
  expected = jax.vjp(reference, x, kernel)[1](dy)
  # The CPU formulation itself (this is the backend the tests run on, so the custom_vjp picks it too).
  pads = conv_ops.explicit_padding(x.shape[1:3], k, stride, rate, padding)
  direct = conv_ops.cpu_conv_grads(x, kernel, dy, stride=stride, rate=rate, pads=pads)
  through_vjp = jax.vjp(ours, x, kernel)[1](dy)
  for got in (direct, through_vjp):
    for g, e in zip(got, expected):
      _assert_close(g, e)


@pytest.mark.parametrize('k,stride,rate,padding,size', [c for c in CASES if c[0] > 1])
def test_shifted_depthwise_values_and_gradients_equal_grouped_autodiff(k, stride, rate, padding, size):
  channels = 5
  x, kernel = _data(channels, (k, k, 1, channels), size)

  def grouped(x, kernel):
    return lax.conv_general_dilated(x, kernel, (stride, stride), padding, rhs_dilation=(rate, rate),
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=channels,
                                    precision=lax.Precision.HIGHEST)

  ours = functools.partial(conv_ops.depthwise_conv2d_shifted, stride=stride, rate=rate, padding=padding)
  y = grouped(x, kernel)
  np.testing.assert_allclose(ours(x, kernel), y, atol=1e-5, rtol=1e-5)
  dy = jnp.asarray(np.random.default_rng(2).normal(size=y.shape), jnp.float32)
  for g, e in zip(jax.vjp(ours, x, kernel)[1](dy), jax.vjp(grouped, x, kernel)[1](dy)):
    _assert_close(g, e)


def test_second_order_and_jit_compose():
  """The custom backward is differentiable under jit like any JAX function (e.g. for gradient penalties)."""
  x, kernel = _data(4, (3, 3, 4, 3), 6)
  loss = lambda f: (lambda w: jnp.sum(jnp.sin(f(x, w))))
  ours = jax.jit(jax.grad(loss(conv_ops.conv2d)))
  reference = jax.grad(loss(lambda x, w: _xla_conv(x, w, 1, 1, 'SAME')))
  np.testing.assert_allclose(ours(kernel), reference(kernel), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('stride', [1, 2])
def test_bfloat16_gradients_keep_the_input_dtypes(stride):
  """bf16 models (config.model.dtype='bfloat16') train: every backward path returns the inputs' dtypes."""
  x, kernel = _data(4, (3, 3, 4, 6), 9)
  x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
  loss = lambda x, w: jnp.sum(conv_ops.conv2d(x, w, stride=stride).astype(jnp.float32))
  for grad in (jax.grad(loss, (0, 1)), jax.jit(jax.grad(loss, (0, 1)))):
    dx, dkernel = grad(x, kernel)
    assert dx.dtype == jnp.bfloat16 and dkernel.dtype == jnp.bfloat16
  expected = jax.grad(lambda w: jnp.sum(_xla_conv(x.astype(jnp.float32), w, stride, 1, 'SAME')))(
      kernel.astype(jnp.float32))
  np.testing.assert_allclose(dkernel.astype(jnp.float32), expected, rtol=0.05, atol=0.5)
