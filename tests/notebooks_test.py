"""The Colab notebooks in colab/: committed clean, only calling the library, and running top to bottom.

Each notebook's first code cell (tagged `parameters`) holds its `SMALL_RUN` switch. The slow test executes a
copy with `SMALL_RUN = True` with `nbclient`, in a kernel of this interpreter (the environment the checkout is
installed in), from the repository root, with `DEEPLAB_JAX_REPO` naming the checkout: the notebooks then
install nothing and download nothing (their small mode reads the TFLite models and VOC photos of
`../shared/data`). Any cell error fails the test, and each notebook must print what shows its cells did
their job (a trained mIoU, the classes found in a real photo, the exported artefact agreeing with the
predictor).
"""
import json
import os
import pathlib
import re
import sys
import time

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
COLAB = REPO / 'colab'
NOTEBOOKS = ('deeplab_jax_quickstart.ipynb', 'train_tpu.ipynb', 'inference.ipynb')

# Printed by each small run; evidence that the cells worked, not only that they raised nothing. `{tmp}` is the
# run's temporary folder (the notebooks' tempfile folders).
EXPECTED_OUTPUT = {
    'deeplab_jax_quickstart.ipynb': (
        r'val mIoU \d\.\d{4}, pixel accuracy \d\.\d{4} \(16 held-out scenes\)',
        r'step 8 \| modules: \[',
        r'pixel accuracy on this held-out scene: \d\.\d{3}',
    ),
    'train_tpu.ipynb': (
        r'Converted \S*deeplabv3_257_mv_gpu\.tflite: \d+ variables loaded, 0 skipped, 0 left new',
        r'global batch 8 over 8 devices, 10 steps',
        r"\{'train': 64, 'val': 16\}",
        r'Reusing dataset synthetic_scenes \({tmp}/tensorflow_datasets/',  # training read the local copy
        r'Final step 10: val mIoU \d\.\d{4}',
        r'Evaluation of step 10 on synthetic_scenes/val \(16 images',
    ),
    'inference.ipynb': (
        r'Converted deeplabv3_mnv2_pascal_quant\.tflite: \d+ variables loaded',
        # The published 8-bit model on a real VOC train photo (an aeroplane, people): it must find the aeroplane.
        r'Found: background \d+%, aeroplane \d+%',
        r'The CRF changed \d+\.\d\d% of the pixels',
        r'The artefact agrees with the predictor on 1?\d\d\.\d{3}% of the pixels',
    ),
}

# Model or training code pasted into a cell instead of calling the library.
FORBIDDEN = (
    (r'^\s*(def|class)\s', 'a function or class definition'),
    (r'\b(import|from)\s+(flax|optax)\b', 'a flax/optax import'),
    (r'\bnn\.(Module|Conv|BatchNorm|compact)\b', 'Flax layers'),
    (r'\b(jax\.grad|value_and_grad)\b', 'a gradient computation'),
)
PLACEHOLDERS = ('YOUR_ORG', 'YOUR_', 'your-org', 'github.com/<', '<REPO_URL>')


def read(name: str) -> nbformat.NotebookNode:
  return nbformat.read(COLAB / name, as_version=nbformat.NO_CONVERT)


def parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
  code_cells = [cell for cell in nb.cells if cell.cell_type == 'code']
  assert 'parameters' in code_cells[0].metadata.get('tags', []), 'the first code cell must be tagged parameters'
  return code_cells[0]


def test_every_notebook_is_tested():
  assert sorted(p.name for p in COLAB.glob('*.ipynb')) == sorted(NOTEBOOKS)


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_is_valid_v4_with_outputs_cleared(name):
  nb = read(name)
  assert nb.nbformat == 4
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert cell.outputs == [] and cell.execution_count is None, f'{name}: a cell has outputs:\n{cell.source}'
  assert len(re.findall(r'^SMALL_RUN = (True|False)\b', parameters_cell(nb).source, re.M)) == 1


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_only_imports_and_calls_the_library(name):
  nb = read(name)
  sources = '\n'.join(cell.source for cell in nb.cells if cell.cell_type == 'code')
  assert re.search(r'^from deeplab_jax import|^import deeplab_jax', sources, re.M)
  for pattern, what in FORBIDDEN:
    match = re.search(pattern, sources, re.M)
    assert match is None, f'{name} contains {what}: {match.group(0)!r}; call the library instead'
  text = '\n'.join(cell.source for cell in nb.cells)
  assert not [p for p in PLACEHOLDERS if p in text], f'{name} holds a placeholder a user must replace'


def _small_mode(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
  cell = parameters_cell(nb)
  cell.source = re.sub(r'^SMALL_RUN = (True|False)\b', 'SMALL_RUN = True', cell.source, flags=re.M)
  return nb


def _kernel_manager(directory: pathlib.Path) -> KernelManager:
  """A kernel running this interpreter, whatever kernelspecs the machine has installed."""
  spec_dir = directory / 'kernels' / 'deeplab_jax_checkout'
  spec_dir.mkdir(parents=True)
  (spec_dir / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'deeplab_jax checkout', 'language': 'python'}))
  specs = KernelSpecManager(kernel_dirs=[str(directory / 'kernels')])
  return KernelManager(kernel_name='deeplab_jax_checkout', kernel_spec_manager=specs)


def _text_outputs(nb: nbformat.NotebookNode) -> str:
  """The cells' text outputs. Consecutive stream outputs are joined as written: the kernel may split one
  `print` into several (`print('step', 8)` writes 'step', ' ', '8', '\\n' separately, and a flush can fall
  between them)."""
  texts = []
  for cell in nb.cells:
    previous = None
    for output in cell.get('outputs', []):
      if output.output_type == 'stream':
        if previous == output.name:
          texts[-1] += output.text
        else:
          texts.append(output.text)
        previous = output.name
        continue
      previous = None
      if output.output_type in ('execute_result', 'display_data'):
        texts.append(output.get('data', {}).get('text/plain', ''))
  return '\n'.join(texts)


@pytest.mark.slow
@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_runs_in_small_mode(name, tmp_path, monkeypatch, shared_data):
  del shared_data  # the small modes read it; the fixture fails clearly where it is missing
  monkeypatch.setenv('DEEPLAB_JAX_REPO', str(REPO))
  monkeypatch.setenv('TMPDIR', str(tmp_path))  # the notebooks' scratch folders (tempfile) land here
  # Compiling is most of a small run's time on a CPU and the runs are tiny: skip XLA's backend optimisations.
  monkeypatch.setenv('XLA_FLAGS', f'{os.environ.get("XLA_FLAGS", "")} --xla_backend_optimization_level=0'.strip())
  nb = _small_mode(read(name))
  client = NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=900,
                          resources={'metadata': {'path': str(REPO)}})
  start = time.time()
  try:
    client.execute()
  finally:
    nbformat.write(nb, tmp_path / name)  # the executed notebook, for reading a failure
    print(f'{name}: {time.time() - start:.0f} s; executed copy {tmp_path / name}')
  outputs = _text_outputs(nb)
  for pattern in EXPECTED_OUTPUT[name]:
    pattern = pattern.replace('{tmp}', re.escape(str(tmp_path)))
    assert re.search(pattern, outputs), f'{name} did not print /{pattern}/; its outputs:\n{outputs[-3000:]}'
