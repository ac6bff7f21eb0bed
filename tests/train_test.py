"""Tests for deeplab_jax.train: sharded == single-device steps, resumption, clear stops, outputs."""
import os
import shutil

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from configs import tiny
import tiny_run
from deeplab_jax import checkpoint
from deeplab_jax import input_pipeline
from deeplab_jax import optim
from deeplab_jax import train
from deeplab_jax.models import create_model


def tiny_synthetic_config(data_dir: str):
  """configs/tiny.py on 33x33 synthetic scenes (16 train, 8 val) in `data_dir`."""
  return tiny_run.config(data_dir)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, (h, w) = config.train.batch_size, config.train.crop_size
  labels = rng.integers(0, config.model.num_classes, (b, h, w)).astype(np.int32)
  labels[:, :3] = 255
  return {'image': rng.uniform(0, 255, (b, h, w, 3)).astype(np.float32), 'label': labels}


def test_sharded_step_equals_single_device_step():
  """8 devices (batch sharded, state replicated) == 1 device with the whole batch."""
  config = tiny.get_config()
  config.model.depthwise_impl = 'grouped'  # compiles faster than the CPU default
  config.train.top_k_percent_pixels = 0.5  # hard-pixel mining runs over the global batch too
  batch = _random_batch(config)
  assert jax.device_count() == 8
  model = create_model(config.model)
  tx, schedule = optim.create_optimizer(config.train)
  initial = jax.device_get(train.create_train_state(config, model, tx, train.create_mesh(jax.devices()[:1])))
  results = {}
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = train.create_mesh(devices)
    state = jax.device_put(initial, NamedSharding(mesh, P()))
    step = train.make_train_step(config, model, tx, schedule, mesh)
    results[len(devices)] = jax.device_get(step(state, input_pipeline.shard_batch(batch, mesh)))
  (single, single_metrics), (sharded, sharded_metrics) = results[1], results[8]
  for key in ('loss', 'total_loss', 'pixel_accuracy'):
    np.testing.assert_allclose(sharded_metrics[key], single_metrics[key], rtol=1e-5, atol=1e-5)
  for name in ('params', 'batch_stats'):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 getattr(sharded, name), getattr(single, name))
  # The momentum trace is the raw gradient: float32 summation order differs, so a looser bound.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-3), sharded.opt_state, single.opt_state)
  # The step updated the BatchNorm statistics (from the whole global batch).
  assert not np.allclose(jax.tree.leaves(initial.batch_stats)[0], jax.tree.leaves(single.batch_stats)[0])
  # Loss, weight decay and learning rate of the first step.
  assert int(single.step) == 1
  assert 1.0 < single_metrics['loss'] < 3.0  # about ln(5) for random labels at initialisation
  assert single_metrics['regularization'] > 0
  np.testing.assert_allclose(single_metrics['total_loss'],
                             single_metrics['loss'] + single_metrics['regularization'], rtol=1e-6)
  np.testing.assert_allclose(single_metrics['learning_rate'], config.train.base_learning_rate, rtol=1e-6)


@pytest.mark.parametrize('field,value,match', [
    ('train.batch_size', 6, 'config.train.batch_size=6 must be a multiple of the number of devices'),
    ('train.num_steps', 0, 'config.train.num_steps must be positive'),
    ('model.num_classes', 7, 'config.model.num_classes=7 differs from config.dataset.num_classes=5'),
])
def test_bad_config_names_the_field(field, value, match):
  config = tiny.get_config()
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(ValueError, match=match):
    train.validate_config(config)


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, data_dir, monkeypatch):
  config = tiny_synthetic_config(data_dir)

  def nan_batches(config, dataset, **kwargs):
    while True:
      batch = _random_batch(config)
      batch['image'][:] = np.nan
      yield batch

  monkeypatch.setattr(input_pipeline, 'create_train_iterator', nan_batches)
  with pytest.raises(FloatingPointError, match=r'training loss became nan at step 1'):
    train.train_and_evaluate(config, str(tmp_path), run_eval=False)
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints', '2'))  # nothing non-finite was saved


def test_train_and_evaluate_writes_outputs_and_resumes_exactly(tmp_path, data_dir, monkeypatch):
  config = tiny_synthetic_config(data_dir)
  # Uninterrupted 4 steps, with evaluation at step 4.
  summary = train.train_and_evaluate(config, str(tmp_path / 'full'))
  assert set(summary['per_class_iou']) == set(input_pipeline.load_dataset(config).info.class_names)
  assert 0.0 <= summary['miou'] <= 1.0 and summary['num_images'] == 8
  full = tmp_path / 'full'
  assert sorted(os.listdir(full / 'checkpoints')) == ['2', '4']
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(full))
  assert sorted(os.listdir(full / 'predictions' / 'step_0000004')) == ['00.png', '01.png']
  assert os.path.exists(full / 'eval' / 'step_0000004.json')

  # The same run killed after step 3, while writing a checkpoint: step 2 is complete, step 3's
  # temporary directory is not. The rerun resumes at step 2 and ends where the uninterrupted run did.
  resumed = tmp_path / 'resumed'
  shutil.copytree(full / 'checkpoints' / '2', resumed / 'checkpoints' / '2')
  os.makedirs(resumed / 'checkpoints' / '3.orbax-checkpoint-tmp' / 'variables')
  real_iterator = input_pipeline.create_train_iterator
  starts = []

  def recording_iterator(config, dataset, *, start_step=0, **kwargs):
    starts.append(start_step)
    return real_iterator(config, dataset, start_step=start_step, **kwargs)

  monkeypatch.setattr(input_pipeline, 'create_train_iterator', recording_iterator)
  train.train_and_evaluate(config, str(resumed), run_eval=False)
  assert starts == [2]
  assert sorted(os.listdir(resumed / 'checkpoints')) == ['2', '4']
  ckpt_full, ckpt_resumed = checkpoint.Checkpointer(str(full)), checkpoint.Checkpointer(str(resumed))
  full_vars, _ = ckpt_full.read_variables(4)
  resumed_vars, _ = ckpt_resumed.read_variables(4)
  ckpt_full.close()
  ckpt_resumed.close()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), full_vars, resumed_vars)
