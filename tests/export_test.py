"""Tests for deeplab_jax.export: artefacts run in a process with only jax and numpy, equal to the library."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import tiny_run

from configs import tiny
from deeplab_jax import checkpoint
from deeplab_jax import export
from deeplab_jax import input_pipeline
from deeplab_jax import predict
from deeplab_jax.models import create_model

REPO = pathlib.Path(__file__).resolve().parents[1]
CROP = 65

# Run by a fresh interpreter: deserializes and calls the artefacts with jax and numpy alone.
SERVER = textwrap.dedent('''
    import sys
    import jax
    import numpy as np

    artefact, inputs, outputs = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(artefact, 'rb') as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    arrays = np.load(inputs)
    results = {}
    for name in arrays.files:
      if name.endswith('__sizes'):
        continue
      args = (arrays[name],) + ((arrays[name + '__sizes'],) if name + '__sizes' in arrays.files else ())
      for key, value in exported.call(*args).items():
        results[f'{name}/{key}'] = np.asarray(value)
    np.savez(outputs, **results)
    library = ('deeplab_jax', 'flax', 'ml_collections', 'orbax')
    loaded = sorted(m for m in sys.modules if m.split('.')[0] in library)
    print('LIBRARY MODULES:', loaded)
''')


@pytest.fixture(scope='module')
def tiny_model(tmp_path_factory):
  """(config, variables, workdir): the tiny 5-class model, eval crop 65, checkpointed."""
  config = tiny.get_config()
  config.eval.crop_size = (CROP, CROP)
  variables = tiny_run.random_variables(config)
  workdir = tmp_path_factory.mktemp('tiny_export')
  ckpt = checkpoint.Checkpointer(str(workdir), async_save=False)
  ckpt.save(5, variables, {'step': np.int32(5), 'opt_state': {}}, config)
  ckpt.close()
  return config, variables, str(workdir)


def _images(batch, height, width, seed):
  return np.random.default_rng(seed).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)


_LIBRARY = {}


def _library_outputs(config, variables, images):
  """What the library computes for each image: Predictor labels / probabilities, the model's logits."""
  key = id(variables)
  if key not in _LIBRARY:  # one Predictor and one jitted apply per model: compiled once per shape
    _LIBRARY[key] = (predict.Predictor(config, variables), jax.jit(create_model(config.model).apply))
  predictor, apply = _LIBRARY[key]
  labels, probabilities = predictor(list(images), return_probabilities=True)
  logits = []
  for image in images:
    canvas, _ = input_pipeline.pad_to_size(image, np.zeros(image.shape[:2]), CROP, CROP, (127.5,) * 3, 255)
    logits.append(np.asarray(apply(variables, canvas[None]))[0, :image.shape[0], :image.shape[1]])
  return [{'labels': l, 'probabilities': p, 'logits': g} for l, p, g in zip(labels, probabilities, logits)]


def _assert_equal_outputs(got, expected):
  """`got`: one image's served outputs; `expected`: `_library_outputs` of that image."""
  np.testing.assert_allclose(got['probabilities'], expected['probabilities'], atol=1e-5)
  np.testing.assert_allclose(got['logits'], expected['logits'], atol=1e-5, rtol=1e-5)
  # Labels equal wherever the top two classes are not tied to within the tolerance.
  top2 = np.sort(expected['probabilities'], axis=-1)[..., -2:]
  decided = top2[..., 1] - top2[..., 0] > 1e-5
  np.testing.assert_array_equal(got['labels'][decided], expected['labels'][decided])
  assert decided.mean() > 0.99
  assert got['labels'].dtype == np.int32


def _check_batch(served, images, sizes, config, variables):
  """Each row's top-left `sizes[i]` of the served outputs equals the library's result for that image."""
  crops = [image[:h, :w] for image, (h, w) in zip(images, sizes)]
  for row, ((h, w), expected) in enumerate(zip(sizes, _library_outputs(config, variables, crops))):
    _assert_equal_outputs({name: value[row, :h, :w] for name, value in served.items()}, expected)


def _serve(tmp_path, artefact, batches):
  """Runs SERVER on `batches` ({name: images}) in a fresh process; returns {name: {output: array}}."""
  np.savez(tmp_path / 'inputs.npz', **batches)
  env = dict(os.environ, PYTHONPATH='')  # nothing of the repository on the path
  result = subprocess.run([sys.executable, '-c', SERVER, str(artefact), str(tmp_path / 'inputs.npz'),
                           str(tmp_path / 'outputs.npz')], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path), env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'LIBRARY MODULES: []' in result.stdout
  outputs = np.load(tmp_path / 'outputs.npz')
  served = {}
  for key in outputs.files:
    name, output = key.split('/')
    served.setdefault(name, {})[output] = outputs[key]
  return served


def test_command_line_export_runs_in_a_plain_process_at_two_batch_sizes(tiny_model, tmp_path):
  config, variables, workdir = tiny_model
  artefact = tmp_path / 'model.jax'
  result = subprocess.run(
      [sys.executable, '-m', 'deeplab_jax.export', f'--checkpoint={workdir}', f'--output={artefact}',
       '--outputs=labels,probabilities,logits'], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Exported step 5' in result.stdout and 'platforms cpu, cuda' in result.stdout
  metadata = json.loads((tmp_path / 'model.jax.json').read_text())
  assert metadata['inputs']['images'] == {'shape': ['dynamic', CROP, CROP, 3], 'dtype': 'uint8',
                                          'max_size': [CROP, CROP],
                                          'layout': 'RGB pixels in [0, 255], [batch, height, width, 3]'}
  assert metadata['inputs']['sizes']['shape'] == ['dynamic', 2]
  assert list(metadata['outputs']) == ['labels', 'probabilities', 'logits']
  assert metadata['class_names'][0] == 'background' and len(metadata['class_names']) == 5
  assert metadata['platforms'] == ['cpu', 'cuda']
  assert metadata['checkpoint']['step'] == 5 and metadata['pad_value'] == [127.5] * 3

  # Batch of 3 with images of three sizes at the top-left of their rows (zeros beyond: ignored).
  sizes = {'one': [(CROP, CROP)], 'three': [(CROP, 40), (33, 65), (13, 7)]}
  batches = {'one': _images(1, CROP, CROP, 0), 'three': _images(3, CROP, CROP, 1)}
  for row, (h, w) in enumerate(sizes['three']):
    batches['three'][row, h:] = 0
    batches['three'][row, :, w:] = 0
  arrays = dict(batches, **{f'{name}__sizes': np.asarray(s, np.int32) for name, s in sizes.items()})
  served = _serve(tmp_path, artefact, arrays)
  for name, images in batches.items():
    assert served[name]['labels'].shape == images.shape[:3]
    _check_batch(served[name], images, sizes[name], config, variables)


def test_dynamic_spatial_export_pads_like_eval(tiny_model, tmp_path):
  config, variables, _ = tiny_model
  exported, metadata = export.export_model(config, variables, height='dynamic', width='dynamic',
                                           outputs=('labels', 'probabilities', 'logits'))
  assert len(exported.in_avals) == 1 and str(exported.in_avals[0].shape) == '(b, h, w, 3)'
  assert metadata['inputs']['images']['shape'] == ['dynamic', 'dynamic', 'dynamic', 3]
  assert metadata['inputs']['images']['max_size'] == [CROP, CROP] and 'sizes' not in metadata['inputs']
  path, _ = export.save(exported, metadata, str(tmp_path / 'dynamic.jax'))
  batches = {'small': _images(2, 20, 31, 2), 'full': _images(1, CROP, 40, 3)}
  served = _serve(tmp_path, path, batches)
  for name, images in batches.items():
    assert served[name]['probabilities'].shape == images.shape[:3] + (5,)
    _check_batch(served[name], images, [images.shape[1:3]] * len(images), config, variables)
  with pytest.raises(Exception, match='shape'):
    export.load(path).call(_images(1, CROP + 1, 10, 4))  # larger than the eval crop


def test_float_input_fixed_batch_and_protocol_flags(tiny_model):
  config, variables, _ = tiny_model
  exported, metadata = export.export_model(config, variables, batch=2, height=40, width=50,
                                           input_dtype='float32', sizes_input=False, platforms=('cpu',),
                                           scales=(0.5,), flip=True, outputs=('probabilities',))
  assert len(exported.in_avals) == 1 and 'sizes' not in metadata['inputs']
  assert exported.in_avals[0].shape == (2, 40, 50, 3) and exported.in_avals[0].dtype == np.float32
  assert metadata['scales'] == [0.5] and metadata['flip'] and metadata['padded_to'] == [CROP, CROP]
  images = _images(2, 40, 50, 5).astype(np.float32)
  probabilities = exported.call(images)['probabilities']
  expected = predict.Predictor(config, variables, scales=(0.5,), flip=True)(list(images),
                                                                             return_probabilities=True)[1]
  np.testing.assert_allclose(probabilities, np.stack(expected), atol=1e-5)
  bigger, metadata = export.export_model(config, variables, height=CROP + 16, width=CROP, platforms=('cpu',))
  assert metadata['padded_to'] == [CROP + 16, CROP]  # a size above the crop becomes the canvas
  assert bigger.out_avals[0].shape[1:] == (CROP + 16, CROP)
  assert [a.shape[1:] for a in bigger.in_avals] == [(CROP + 16, CROP, 3), (2,)]


@pytest.mark.parametrize('kwargs,match', [
    (dict(outputs=('labels', 'scores')),
     r'--outputs=labels,scores: choose one or more of labels, probabilities'),
    (dict(height='tall'), r"--height='tall': expected a positive integer or 'dynamic'"),
    (dict(batch=0), r"--batch=0: expected a positive integer or 'dynamic'"),
    (dict(input_dtype='int16'), r"--input_dtype='int16' is not one of \('uint8', 'float32'\)"),
    (dict(output_stride=4), r'output_stride=4 .* is not one of \(8, 16, 32\)'),
])
def test_bad_settings_name_the_flag(tiny_model, kwargs, match):
  config, variables, _ = tiny_model
  with pytest.raises(ValueError, match=match):
    export.export_model(config, variables, **kwargs)


@pytest.mark.slow
def test_tf_saved_model_equals_the_artefact(tiny_model, tmp_path):
  tf = pytest.importorskip('tensorflow')
  config, variables, _ = tiny_model
  exported, metadata = export.export_model(config, variables, outputs=('labels', 'probabilities'),
                                           platforms=('cpu',))
  export.save_tf_saved_model(config, variables, str(tmp_path / 'saved_model'), metadata=metadata,
                             platforms=('cpu',))
  images, sizes = _images(2, CROP, CROP, 6), np.array([[CROP, CROP], [30, 20]], np.int32)
  served = tf.saved_model.load(str(tmp_path / 'saved_model')).signatures['serving_default'](
      images=tf.constant(images), sizes=tf.constant(sizes))
  expected = exported.call(images, sizes)
  np.testing.assert_allclose(served['probabilities'].numpy(), expected['probabilities'], atol=1e-5)
  np.testing.assert_array_equal(served['labels'].numpy(), expected['labels'])
