"""Transparent huge pages for the host memory XLA:CPU allocates: CPU training starts with them.

XLA:CPU allocates a step's temporary buffers with glibc's malloc when the step starts and frees them when it
ends. Buffers above glibc's mmap threshold (at most 32 MiB) come straight from the kernel each time, in 4 KiB
pages that the kernel faults in and zeroes one by one: an Xception-65 train step at batch 2, crop 513 took
about 640,000 page faults, 1.3-1.5 s of system time on a 2-core CPU (~12% of the step's CPU time).

On Linux machines whose transparent huge pages are `madvise` (the common default), glibc 2.35+ backs its
mmapped allocations with 2 MiB pages when started with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`: the same step
then takes ~2,400 faults and ~0.3 s of system time and ran 10-16% faster in interleaved runs (MobileNetV2's
step 21-27%; ResNet-101's 20 s step, whose allocations weigh less, within noise: BENCHMARKS.md). glibc reads
its tunables only when a process starts, so `python -m deeplab_jax.main` re-executes itself once with the
tunable set (`reexec_with_hugepages`) before JAX loads, and only where JAX can run on nothing but the CPU
(no accelerator plugin installed, or `JAX_PLATFORMS=cpu`): accelerator hosts are left as they are.
Prediction does not: ResNet-101 OS8 inference ran slower with it in 4 of 7 interleaved pairs (by ~10% at
the median; cause not pinned down), so `deeplab_jax.predict` and the inference rows of benchmarks/peers.py
run without it.

Opt out with `GLIBC_TUNABLES=glibc.malloc.hugetlb=0`: a setting of this tunable already in the environment is
always kept. Your own scripts get the same by starting Python with the variable set:
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python my_train.py`.
"""
from collections.abc import Mapping
import importlib.metadata
import importlib.util
import os
import pathlib
import re
import sys

TUNABLE = 'glibc.malloc.hugetlb'
THP_SETTING = pathlib.Path('/sys/kernel/mm/transparent_hugepage/enabled')
# JAX finds accelerator back ends as installed plugins (entry points or `jax_plugins.*` modules) or libtpu.
_ACCELERATOR_MODULES = ('jax_plugins', 'libtpu')


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the running C library when it is glibc, else None (musl, macOS, Windows)."""
  try:
    match = re.fullmatch(r'glibc (\d+)\.(\d+)', os.confstr('CS_GNU_LIBC_VERSION') or '')
  except (AttributeError, ValueError, OSError):  # no confstr, or no such name on this system
    return None
  return (int(match[1]), int(match[2])) if match else None


def thp_mode(setting_file: pathlib.Path = THP_SETTING) -> str | None:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), None when it has none."""
  try:
    match = re.search(r'\[(\w+)\]', setting_file.read_text())
  except OSError:
    return None
  return match[1] if match else None


def jax_is_cpu_only(environ: Mapping[str, str]) -> bool:
  """True when JAX can only run on the CPU here: `JAX_PLATFORMS=cpu`, or no accelerator plugin installed.

  Decided without importing JAX (the re-execution happens before JAX loads).
  """
  platforms = [p.strip() for p in environ.get('JAX_PLATFORMS', '').lower().split(',') if p.strip()]
  if platforms:
    return platforms == ['cpu']
  if importlib.metadata.entry_points(group='jax_plugins'):
    return False
  return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_MODULES)


def _setting(environ: Mapping[str, str]) -> str | None:
  """The `glibc.malloc.hugetlb=...` item of `GLIBC_TUNABLES`, None when it has none."""
  return next((item for item in environ.get('GLIBC_TUNABLES', '').split(':')
               if item.split('=', 1)[0] == TUNABLE), None)


def tunable_set(environ: Mapping[str, str]) -> bool:
  """True when `GLIBC_TUNABLES` already sets `glibc.malloc.hugetlb` (to any value: the user's choice)."""
  return _setting(environ) is not None


def with_hugepages(environ: Mapping[str, str]) -> dict[str, str]:
  """A copy of `environ` whose `GLIBC_TUNABLES` also asks glibc's malloc for transparent huge pages.

  Other tunables are kept, and so is a `glibc.malloc.hugetlb` value already there.
  """
  env = dict(environ)
  if not tunable_set(env):
    env['GLIBC_TUNABLES'] = ':'.join(filter(None, [env.get('GLIBC_TUNABLES', ''), f'{TUNABLE}=1']))
  return env


def should_reexec(environ: Mapping[str, str]) -> bool:
  """Whether a CPU training process started with `environ` gains from restarting with the tunable."""
  version = glibc_version()
  return (sys.platform.startswith('linux') and version is not None and version >= (2, 35)
          and thp_mode() == 'madvise' and not tunable_set(environ) and jax_is_cpu_only(environ))


def reexec_with_hugepages() -> None:
  """Replaces this process by the same command with `glibc.malloc.hugetlb=1` when `should_reexec` says so.

  Call it first thing in a program's `__main__` block, before JAX (or anything large) is imported. The
  process keeps its PID, arguments, standard streams and working directory; the new environment carries the
  tunable, so it re-executes at most once. Under `THP=always` malloc's pages are huge already, and under
  `never` the tunable cannot help: both run as they are.
  """
  if should_reexec(os.environ):
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], with_hugepages(os.environ))


def describe(environ: Mapping[str, str] = os.environ) -> str:
  """One line for the run's log: the tunable's setting and the kernel's THP mode."""
  setting = _setting(environ) or f'{TUNABLE} unset'
  return f'host malloc: {setting} (transparent huge pages: {thp_mode() or "not available"})'
