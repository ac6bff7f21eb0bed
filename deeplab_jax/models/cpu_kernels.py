"""Native CPU kernels for what XLA:CPU cannot do in one pass, built on first use and called through XLA FFI.

One kernel today: the filter gradient of a depthwise convolution (`cpu_kernels.cc`). Written with XLA's
operations it is k*k reductions, each reading the input and the output gradient from memory again; the
kernel reads each once. Measured on a 2-core AMD EPYC VM (two runs): `[2, 257, 257, 128]` 51-63 -> 22-32 ms,
`[2, 65, 65, 728]` 20-22 -> 8.5-8.7 ms, rate 12 on `[2, 33, 33, 2048]` 27 -> 10-13 ms; the Xception-65 V3+
train step b2 513 5.31 -> 4.89 s (12 alternated pairs, faster in each; BENCHMARKS.md).

`available()` compiles `cpu_kernels.cc` with the system C++ compiler (`$CXX`, else `c++`) against the FFI
headers jaxlib ships, once per source, jaxlib and compiler (cached under `$XDG_CACHE_HOME/deeplab_jax` or
`~/.cache/deeplab_jax`; about 3 s), loads it and registers its handlers for the CPU platform. Where that
fails (no compiler, an unwritable cache, a JAX without FFI thread pools or sharding rules) it logs one warning
saying why and callers keep their XLA formulation: the same values, slower. `DEEPLAB_JAX_CPU_KERNELS=0` turns
the kernels off. They are only used when JAX's default backend is the CPU. Over a batch sharded on several
devices each device runs the kernel on its own examples and the sums are added.
"""
import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading

from absl import logging
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

ENV_SWITCH = 'DEEPLAB_JAX_CPU_KERNELS'
_SOURCE = pathlib.Path(__file__).with_name('cpu_kernels.cc')
_FLAGS = ('-O3', '-std=c++17', '-shared', '-fPIC', '-w')
_DEPTHWISE_FILTER_GRAD = 'deeplab_depthwise_filter_grad'
_lock = threading.Lock()
_kernels = {}  # 'library': the loaded CDLL (kept for the life of the process); the partitioned kernels


def cache_dir() -> pathlib.Path:
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return pathlib.Path(base) / 'deeplab_jax' / 'cpu_kernels'


def _compiler() -> str:
  name = os.environ.get('CXX', 'c++')
  path = shutil.which(name)
  if path is None:
    raise RuntimeError(f'no C++ compiler: {name!r} (from $CXX, default c++) is not on PATH')
  return path


def _build(compiler: str) -> pathlib.Path:
  """The shared library for this source, jaxlib and compiler: from the cache, else compiled into it."""
  include = jax.ffi.include_dir()
  version = subprocess.run([compiler, '--version'], capture_output=True, text=True, timeout=60).stdout
  key = hashlib.sha256()
  for part in (_SOURCE.read_bytes(), jax.__version__.encode(), include.encode(), compiler.encode(),
               version.encode(), ' '.join(_FLAGS).encode(), platform.machine().encode()):
    key.update(part + b'\0')
  target = cache_dir() / f'cpu_kernels-{key.hexdigest()[:16]}.so'
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  # Compiled beside the target and renamed into place: a concurrent process sees the whole file or none.
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    partial = pathlib.Path(tmp) / target.name
    result = subprocess.run([compiler, *_FLAGS, f'-I{include}', str(_SOURCE), '-o', str(partial)],
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
      errors = [line for line in (result.stderr + result.stdout).splitlines() if 'error' in line]
      raise RuntimeError(f'{compiler} failed on {_SOURCE} (exit {result.returncode}): '
                         + ' | '.join(errors[:3] or [result.stderr.strip()[-500:]]))
    os.replace(partial, target)
  return target


@functools.cache
def _load() -> bool:
  if os.environ.get(ENV_SWITCH, '1') == '0':
    logging.info('%s=0: native CPU kernels off; using XLA formulations.', ENV_SWITCH)
    return False
  try:
    library = ctypes.CDLL(str(_build(_compiler())))
    jax.ffi.register_ffi_target(_DEPTHWISE_FILTER_GRAD, jax.ffi.pycapsule(library.DeepLabDepthwiseFilterGrad),
                                platform='cpu')
    _kernels.update(library=library, depthwise_filter_grad=_partitioned_kernel())
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('deeplab_jax: native CPU kernels unavailable (%s); using XLA formulations, which give '
                    'the same values more slowly (CPU training). %s=0 silences this.', e, ENV_SWITCH)
    return False
  return True


def available() -> bool:
  """Whether the native kernels can be called: default backend CPU, built (once) and registered."""
  if jax.default_backend() != 'cpu':
    return False
  with _lock:
    return _load()


def depthwise_filter_grad(x_padded: jax.Array, dy: jax.Array, kernel_size, stride: int,
                          rate: int) -> jax.Array:
  """`[kh * kw, C]` float32 filter gradient of a depthwise conv (see `cpu_kernels.cc`); needs `available()`.

  Not differentiable itself: `conv_ops` gives it its backward pass.

  Args:
    x_padded: `[B, Hp, Wp, C]` float32, the conv's input with its padding.
    dy: `[B, H, W, C]` float32, the gradient of the conv's output.
    kernel_size: `(kh, kw)`.
    stride: the conv's stride.
    rate: the conv's atrous rate.
  """
  return _kernels['depthwise_filter_grad'](x_padded, dy, tuple(kernel_size), stride, rate)


def _call_kernel(x_padded, dy, kernel_size, stride, rate):
  kernel_h, kernel_w = kernel_size
  out = jax.ShapeDtypeStruct((kernel_h * kernel_w, x_padded.shape[-1]), jnp.float32)
  return jax.ffi.ffi_call(_DEPTHWISE_FILTER_GRAD, out)(
      x_padded, dy, kernel_h=kernel_h, kernel_w=kernel_w, stride=stride, rate=rate)


def _replicated_result(kernel_size, stride, rate, mesh, arg_shapes, result_shape):
  del kernel_size, stride, rate, arg_shapes, result_shape
  return NamedSharding(mesh, P())


def _partition_over_batch(kernel_size, stride, rate, mesh, arg_shapes, result_shape):
  del result_shape
  spec = getattr(arg_shapes[0].sharding, 'spec', ())
  batch_axes = spec[0] if len(spec) else None
  by_batch = NamedSharding(mesh, P(batch_axes))  # other dimensions gathered: the kernel reads whole images

  def per_device(x_padded, dy):
    sums = _call_kernel(x_padded, dy, kernel_size, stride, rate)
    return lax.psum(sums, batch_axes) if batch_axes else sums

  return mesh, per_device, NamedSharding(mesh, P()), (by_batch, by_batch)


def _partitioned_kernel():
  """The kernel over a batch sharded on devices: each device sums its own examples, then `psum`.

  XLA cannot see inside a custom call and would otherwise gather the whole batch onto every device.
  """
  kernel = custom_partitioning(_call_kernel, static_argnums=(2, 3, 4))
  kernel.def_partition(infer_sharding_from_operands=_replicated_result, partition=_partition_over_batch,
                       sharding_rule='b h w c, b p q c -> t c')
  return kernel
