"""The package as a user's program meets it: every module imports together (no flags defined at import),
and config files load by path from any directory and from a non-editable install."""
import os
import pkgutil
import subprocess
import sys
import textwrap

import pytest

import deeplab_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, cwd, **env):
  return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                        timeout=600, env=dict(os.environ, JAX_PLATFORMS='cpu', **env))


def test_every_module_imports_in_one_program_that_defines_its_own_config_flag(tmp_path):
  modules = sorted(m.name for m in pkgutil.walk_packages(deeplab_jax.__path__, 'deeplab_jax.'))
  assert {'deeplab_jax.main', 'deeplab_jax.flops', 'deeplab_jax.convert.__main__'} <= set(modules)
  result = _python(f'''
      import importlib
      from absl import flags
      from ml_collections import config_flags
      for name in {modules!r}:
        importlib.import_module(name)
      config_flags.DEFINE_config_file('config', None, 'the user program own flag')
      flags.DEFINE_string('workdir', None, 'the user program own flag')
      print('defined:', sorted(f for f in flags.FLAGS if f in ('config', 'workdir', 'source', 'output')))
      ''', cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "defined: ['config', 'workdir']" in result.stdout


def test_configs_load_by_path_from_another_directory(tmp_path):
  # voc_resnet101_v3plus builds on voc_resnet101_v3, which builds on default.
  result = subprocess.run(
      [sys.executable, '-m', 'deeplab_jax.flops', f'--config={REPO}/configs/voc_resnet101_v3plus.py'],
      cwd=tmp_path, capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'multiply-adds:' in result.stdout


@pytest.mark.slow
def test_configs_load_with_a_non_editable_install(tmp_path):
  site = tmp_path / 'site'
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--no-build-isolation',
                  '--target', str(site), REPO], check=True, capture_output=True, timeout=600)
  assert (site / 'deeplab_jax' / 'config_files.py').exists() and not (site / 'configs').exists()
  assert (site / 'deeplab_jax' / 'models' / 'cpu_kernels.cc').exists()  # built on first use
  # Another folder, only the installed package on the path (PYTHONSAFEPATH keeps the cwd off it).
  result = _python(f'''
      import deeplab_jax
      assert deeplab_jax.__file__.startswith({str(site)!r}), deeplab_jax.__file__
      from absl import flags
      from ml_collections import config_flags
      config = config_flags.DEFINE_config_file('config')
      flags.FLAGS(['program', '--config=' + {REPO + '/configs/voc_xception71.py'!r}])
      print(config.value.model.backbone, config.value.dataset.name)
      ''', cwd=tmp_path, PYTHONPATH=str(site), PYTHONSAFEPATH='1')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'xception_71 voc2012_segmentation' in result.stdout
