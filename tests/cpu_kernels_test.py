"""The native CPU depthwise filter gradient equals XLA's formulation; it is built once, used, and optional."""
import ast
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deeplab_jax.models import conv_ops
from deeplab_jax.models import cpu_kernels

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get('CXX', 'c++')) is None,
                                    reason='no C++ compiler here: the XLA formulation is tested instead')

# (kernel, stride, rate, padding, height, width, channels, batch): SAME and explicit/asymmetric pads, strided,
# atrous (rate 6 on a small map: most taps read padding), channel counts off the vector width, batch 1 and 3.
CASES = [
    (3, 1, 1, 'SAME', 9, 10, 5, 2),
    (3, 2, 1, 'SAME', 10, 11, 19, 1),
    (3, 2, 1, ((1, 1), (1, 1)), 9, 9, 16, 3),
    (3, 1, 2, 'SAME', 12, 9, 33, 2),
    (3, 1, 6, 'SAME', 5, 6, 7, 2),
    (2, 1, 3, ((1, 2), (2, 1)), 8, 9, 3, 2),
    (5, 2, 2, ((4, 4), (4, 4)), 13, 12, 8, 1),
    (3, 1, 1, 'VALID', 7, 8, 1, 1),
]


def _assert_close(got, expected):
  expected = np.asarray(expected)
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(expected).max())))


def _inputs(k, stride, rate, padding, height, width, channels, batch, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, height, width, channels)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, 1, channels)), jnp.float32)
  pads = conv_ops.explicit_padding((height, width), k, stride, rate, padding)
  y = conv_ops.depthwise_conv2d_shifted(x, kernel, stride=stride, rate=rate, padding=padding)
  dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  return x, kernel, pads, dy


def _grouped(stride, rate, padding):
  def conv(x, kernel):
    return lax.conv_general_dilated(x, kernel, (stride, stride), padding, rhs_dilation=(rate, rate),
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                    feature_group_count=x.shape[-1], precision=lax.Precision.HIGHEST)
  return conv


@needs_compiler
@pytest.mark.parametrize('case', CASES)
def test_native_filter_gradient_equals_the_xla_formulation_and_autodiff(case):
  k, stride, rate, padding = case[:4]
  x, kernel, pads, dy = _inputs(*case)
  assert cpu_kernels.available()
  x_padded = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  native = jax.jit(cpu_kernels.depthwise_filter_grad, static_argnums=(2, 3, 4))(x_padded, dy, (k, k), stride,
                                                                                rate)
  xla_form = conv_ops.xla_depthwise_filter_grad(x_padded, dy, kernel_size=(k, k), stride=stride, rate=rate,
                                                pads=pads)
  _, autodiff = jax.vjp(_grouped(stride, rate, padding), x, kernel)[1](dy)
  _assert_close(native, xla_form)
  _assert_close(native.reshape(kernel.shape), autodiff)


@needs_compiler
def test_the_training_gradient_calls_the_native_kernel_in_float32_only():
  x, kernel, _, _ = _inputs(*CASES[1])
  loss = lambda x, kernel: jnp.sum(jnp.sin(conv_ops.depthwise_conv2d_shifted(x, kernel, stride=2)))
  lowered = lambda *args: jax.jit(jax.grad(loss, (0, 1))).lower(*args).as_text()
  assert 'deeplab_depthwise_filter_grad' in lowered(x, kernel)
  assert 'deeplab_depthwise_filter_grad' not in lowered(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))


@needs_compiler
def test_gradients_through_the_native_kernel_can_be_differentiated_again():
  """Reverse over reverse (e.g. a gradient penalty): the kernel's own backward equals autodiff's."""
  k, stride, rate, padding = CASES[3][:4]
  x, kernel, _, _ = _inputs(*CASES[3])

  def penalty(conv):
    inner = jax.grad(lambda x, kernel: jnp.sum(jnp.sin(conv(x, kernel))), (0, 1))
    return lambda x, kernel: sum(jnp.sum(g ** 2) for g in inner(x, kernel))

  ours = lambda x, kernel: conv_ops.depthwise_conv2d_shifted(x, kernel, stride=stride, rate=rate,
                                                             padding=padding)
  got = jax.jit(jax.grad(penalty(ours), (0, 1)))(x, kernel)
  expected = jax.grad(penalty(_grouped(stride, rate, padding)), (0, 1))(x, kernel)
  for g, e in zip(got, expected):
    _assert_close(g, e)


@needs_compiler
def test_over_a_batch_sharded_on_devices_each_device_sums_its_own_examples():
  """Each device runs the kernel on its shard and the sums are added: no gathered batch, the same gradient."""
  mesh = Mesh(np.array(jax.devices()[:4]), ('data',))  # conftest's fake CPU devices
  x, kernel, _, _ = _inputs(3, 1, 2, 'SAME', 9, 10, 5, 8)
  loss = lambda kernel, x: jnp.sum(jnp.sin(conv_ops.depthwise_conv2d_shifted(x, kernel, rate=2)))
  grad = jax.jit(jax.grad(loss))
  sharded_x = jax.device_put(x, NamedSharding(mesh, P('data')))
  compiled = grad.lower(kernel, sharded_x).compile().as_text()
  assert 'deeplab_depthwise_filter_grad' in compiled and 'all-reduce' in compiled
  assert 'all-gather' not in compiled
  _assert_close(grad(kernel, sharded_x), grad(kernel, x))


_CHILD = textwrap.dedent('''
    import os
    import jax, jax.numpy as jnp, numpy as np
    from deeplab_jax.models import conv_ops, cpu_kernels
    print('AVAILABLE', cpu_kernels.available())
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 10, 4)), jnp.float32)
    kernel = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 1, 4)), jnp.float32)
    loss = lambda kernel: jnp.sum(jnp.sin(conv_ops.depthwise_conv2d_shifted(x, kernel, stride=2)))
    print('GRAD', np.asarray(jax.jit(jax.grad(loss))(kernel)).ravel().tolist())
    print('FILES', sorted(os.listdir(cpu_kernels.cache_dir())) if cpu_kernels.cache_dir().exists() else [])
''')


def _child(tmp_path, **env):
  result = subprocess.run([sys.executable, '-c', _CHILD], capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'XDG_CACHE_HOME': str(tmp_path), **env})
  assert result.returncode == 0, result.stderr
  lines = {line.split(' ', 1)[0]: line.split(' ', 1)[1] for line in result.stdout.splitlines() if ' ' in line}
  return lines, result.stderr


def test_without_a_compiler_or_switched_off_the_xla_formulation_gives_the_same_gradient(tmp_path):
  missing, missing_log = _child(tmp_path / 'a', CXX=str(tmp_path / 'no-such-compiler'))
  assert missing['AVAILABLE'] == 'False'
  assert 'native CPU kernels unavailable' in missing_log and 'no-such-compiler' in missing_log
  off, off_log = _child(tmp_path / 'b', DEEPLAB_JAX_CPU_KERNELS='0')
  assert off['AVAILABLE'] == 'False' and off['FILES'] == '[]'
  assert 'unavailable' not in off_log
  assert missing['GRAD'] == off['GRAD']


@needs_compiler
def test_the_library_is_built_once_then_reused_and_gives_the_xla_gradient(tmp_path):
  off, _ = _child(tmp_path / 'off', DEEPLAB_JAX_CPU_KERNELS='0')
  first, _ = _child(tmp_path / 'on')
  assert first['AVAILABLE'] == 'True'
  (name,) = ast.literal_eval(first['FILES'])
  library = tmp_path / 'on' / 'deeplab_jax' / 'cpu_kernels' / name
  built_at = library.stat().st_mtime_ns
  second, _ = _child(tmp_path / 'on')
  assert second['AVAILABLE'] == 'True' and second['FILES'] == first['FILES']
  assert library.stat().st_mtime_ns == built_at
  np.testing.assert_allclose(ast.literal_eval(first['GRAD']), ast.literal_eval(off['GRAD']), rtol=1e-5,
                             atol=1e-5)
