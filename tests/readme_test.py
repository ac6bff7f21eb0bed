"""The README's Python code blocks run as written (each in a fresh process, beside a tiny trained run)."""
import os
import re
import shutil
import subprocess
import sys

import pytest

import tiny_run
from deeplab_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks():
  with open(os.path.join(REPO, 'README.md')) as f:
    return re.findall(r'^```python\n(.*?)^```', f.read(), flags=re.M | re.S)


def test_the_readme_has_python_blocks():
  assert len(python_blocks()) >= 2


@pytest.fixture(scope='module')
def user_folder(tmp_path_factory):
  """A folder as a user has it after the README's first command: `runs/synthetic` holds a trained run."""
  folder = tmp_path_factory.mktemp('user')
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  train.train_and_evaluate(tiny_run.config(data_dir), str(folder / 'runs' / 'synthetic'), run_eval=False)
  shutil.copytree(os.path.join(REPO, 'configs'), folder / 'configs')
  return folder


@pytest.mark.slow
@pytest.mark.parametrize('index', range(len(python_blocks())))
def test_readme_python_block_runs(index, user_folder):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  result = subprocess.run([sys.executable, '-c', python_blocks()[index]], cwd=user_folder, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
