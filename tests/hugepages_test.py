"""Tests for deeplab_jax.hugepages: when a CPU training process restarts with huge pages, and that it works."""
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from deeplab_jax import hugepages

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_with_hugepages_adds_the_tunable_and_keeps_the_others():
  assert hugepages.with_hugepages({})['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'
  env = hugepages.with_hugepages({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2', 'PATH': '/bin'})
  assert env == {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1', 'PATH': '/bin'}
  for kept in ('glibc.malloc.hugetlb=0', 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2'):
    assert hugepages.with_hugepages({'GLIBC_TUNABLES': kept})['GLIBC_TUNABLES'] == kept
  # A longer tunable whose name starts the same is not this one.
  env = hugepages.with_hugepages({'GLIBC_TUNABLES': 'glibc.malloc.hugetlbx=0'})
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlbx=0:glibc.malloc.hugetlb=1'


def test_thp_mode_reads_the_bracketed_setting(tmp_path):
  setting = tmp_path / 'enabled'
  for text, mode in (('always [madvise] never\n', 'madvise'), ('[always] madvise never\n', 'always'),
                     ('always madvise [never]\n', 'never')):
    setting.write_text(text)
    assert hugepages.thp_mode(setting) == mode
  assert hugepages.thp_mode(tmp_path / 'missing') is None


def test_jax_is_cpu_only(monkeypatch):
  assert hugepages.jax_is_cpu_only({'JAX_PLATFORMS': 'cpu'})
  assert hugepages.jax_is_cpu_only({'JAX_PLATFORMS': ' CPU '})
  for platforms in ('cuda', 'tpu', 'cuda,cpu'):
    assert not hugepages.jax_is_cpu_only({'JAX_PLATFORMS': platforms})
  # Without JAX_PLATFORMS: an installed accelerator plugin (entry point or module) means "maybe not CPU".
  monkeypatch.setattr(hugepages.importlib.metadata, 'entry_points', lambda group: [])
  monkeypatch.setattr(hugepages.importlib.util, 'find_spec', lambda name: None)
  assert hugepages.jax_is_cpu_only({})
  monkeypatch.setattr(hugepages.importlib.util, 'find_spec', lambda name: name == 'libtpu' or None)
  assert not hugepages.jax_is_cpu_only({})
  assert hugepages.jax_is_cpu_only({'JAX_PLATFORMS': 'cpu'})  # forced CPU on an accelerator host
  monkeypatch.setattr(hugepages.importlib.util, 'find_spec', lambda name: None)
  monkeypatch.setattr(hugepages.importlib.metadata, 'entry_points', lambda group: ['jax_cuda12_plugin'])
  assert not hugepages.jax_is_cpu_only({})


def test_should_reexec_only_where_it_helps(monkeypatch):
  monkeypatch.setattr(hugepages.sys, 'platform', 'linux')
  monkeypatch.setattr(hugepages, 'glibc_version', lambda: (2, 36))
  monkeypatch.setattr(hugepages, 'thp_mode', lambda: 'madvise')
  cpu = {'JAX_PLATFORMS': 'cpu'}
  assert hugepages.should_reexec(cpu)
  assert not hugepages.should_reexec({**cpu, 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'})  # the user's choice
  assert not hugepages.should_reexec(hugepages.with_hugepages(cpu))  # so it restarts at most once
  assert not hugepages.should_reexec({'JAX_PLATFORMS': 'tpu'})
  for mode in ('always', 'never', None):
    monkeypatch.setattr(hugepages, 'thp_mode', lambda mode=mode: mode)
    assert not hugepages.should_reexec(cpu)
  monkeypatch.setattr(hugepages, 'thp_mode', lambda: 'madvise')
  monkeypatch.setattr(hugepages, 'glibc_version', lambda: (2, 34))  # no glibc.malloc.hugetlb before 2.35
  assert not hugepages.should_reexec(cpu)
  monkeypatch.setattr(hugepages, 'glibc_version', lambda: None)  # musl
  assert not hugepages.should_reexec(cpu)
  monkeypatch.setattr(hugepages, 'glibc_version', lambda: (2, 36))
  monkeypatch.setattr(hugepages.sys, 'platform', 'darwin')
  assert not hugepages.should_reexec(cpu)


# Restarts (or not), then reports the environment, its arguments, and how much of a freshly malloc'ed and
# written 64 MiB block the kernel backs with huge pages (AnonHugePages of the process, before and after).
_PROBE = textwrap.dedent('''
    import ctypes, os, sys
    from deeplab_jax import hugepages
    with open(sys.argv[1], 'a') as f:
      f.write('started\\n')
    hugepages.reexec_with_hugepages()

    def anon_huge_kib():
      for line in open('/proc/self/smaps_rollup'):
        if line.startswith('AnonHugePages:'):
          return int(line.split()[1])

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    before = anon_huge_kib()
    block = libc.malloc(64 << 20)
    ctypes.memset(block, 1, 64 << 20)
    print(os.environ.get('GLIBC_TUNABLES', ''), sys.argv[2:], anon_huge_kib() - before, sep='|')
''')


@pytest.mark.skipif(not hugepages.should_reexec({'JAX_PLATFORMS': 'cpu'}),
                    reason='needs Linux, glibc >= 2.35 and transparent huge pages in madvise mode')
def test_main_restarts_once_with_huge_pages_for_malloc(tmp_path):
  """What `python -m deeplab_jax.main` does first, run for real: one restart, same arguments, huge pages."""
  probe = tmp_path / 'probe.py'
  probe.write_text(_PROBE)
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))

  def run(**extra):
    starts = tmp_path / f'starts{len(list(tmp_path.iterdir()))}'
    out = subprocess.run([sys.executable, str(probe), str(starts), '--flag', 'two words'], env={**env, **extra},
                         check=True, capture_output=True, text=True).stdout.strip().split('|')
    return starts.read_text().count('started'), out[0], out[1], int(out[2])

  starts, tunables, argv, huge_kib = run()
  assert (starts, tunables, argv) == (2, 'glibc.malloc.hugetlb=1', "['--flag', 'two words']")
  assert huge_kib >= 32 << 10, f'only {huge_kib} KiB of the 64 MiB block in huge pages'
  # The user's opt-out is kept: no restart, and glibc leaves malloc's block in 4 KiB pages.
  starts, tunables, argv, huge_kib = run(GLIBC_TUNABLES='glibc.malloc.hugetlb=0')
  assert (starts, tunables, huge_kib) == (1, 'glibc.malloc.hugetlb=0', 0)
