"""Tests for deeplab_jax.checkpoint: round trip of sharded state, retention, atomicity, clear errors."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax
import pytest

from deeplab_jax import checkpoint
from deeplab_jax import train


def _config(backbone='mobilenet_v2', num_classes=3):
  return ml_collections.ConfigDict({'model': {'backbone': backbone, 'num_classes': num_classes,
                                              'dtype': 'float32'},
                                    'train': {'crop_size': (33, 33)}})


def _state(num_classes=3, seed=0):
  mesh = train.create_mesh()
  rng = np.random.default_rng(seed)
  params = {'MobilenetV2': {'Conv': {'kernel': rng.normal(size=(3, 3, 3, 4)).astype(np.float32)}},
            'logits/semantic': {'kernel': rng.normal(size=(1, 1, 4, num_classes)).astype(np.float32),
                                'bias': rng.normal(size=(num_classes,)).astype(np.float32)}}
  batch_stats = {'MobilenetV2': {'Conv/BatchNorm': {'mean': np.ones(4, np.float32),
                                                    'var': np.full(4, 2.0, np.float32)}}}
  replicated = NamedSharding(mesh, P())
  variables = jax.device_put({'params': params, 'batch_stats': batch_stats}, replicated)
  opt_state = optax.sgd(0.1, momentum=0.9).init(variables['params'])
  opt_state = jax.tree.map(lambda x: x + 1.5, opt_state)
  return variables, {'step': jax.device_put(jnp.int32(7), replicated), 'opt_state': opt_state}


def _zeros_like(tree):
  return jax.tree.map(jnp.zeros_like, tree)


def test_round_trip_keeps_values_structure_and_sharding(tmp_path):
  variables, train_state = _state()
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  ckpt.save(7, variables, train_state, _config())
  ckpt.wait()
  restored_vars, restored_state = ckpt.restore(7, _zeros_like(variables), _zeros_like(train_state), _config())
  ckpt.close()
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               (variables, train_state), (restored_vars, restored_state))
  assert jax.tree.structure(restored_state) == jax.tree.structure(train_state)
  leaf = restored_vars['params']['logits/semantic']['kernel']
  assert leaf.sharding.is_equivalent_to(variables['params']['logits/semantic']['kernel'].sharding, 4)
  assert ckpt.saved_config(7)['model']['backbone'] == 'mobilenet_v2'


def test_keeps_latest_n_and_the_best(tmp_path):
  variables, train_state = _state()
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, async_save=False)
  for step, miou in [(1, 0.5), (2, 0.9), (3, None), (4, 0.6), (5, None)]:
    ckpt.save(step, variables, train_state, _config(), None if miou is None else {'miou': miou})
  ckpt.wait()
  assert sorted(ckpt.all_steps()) == [2, 4, 5]
  assert ckpt.best_step() == 2 and ckpt.latest_step() == 5
  assert sorted(os.listdir(ckpt.directory)) == ['2', '4', '5']
  # Saving an existing step is a no-op, not an error (a resumed run re-reaching a saved step).
  assert not ckpt.save(5, variables, train_state, _config())
  ckpt.close()


def test_leftover_temporary_directory_is_ignored_and_removed(tmp_path):
  variables, train_state = _state()
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(3, variables, train_state, _config())
  ckpt.close()
  # A run killed while saving step 4 leaves only orbax's temporary directory behind.
  partial = os.path.join(ckpt.directory, '4.orbax-checkpoint-tmp')
  os.makedirs(os.path.join(partial, 'variables'))
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  assert ckpt.latest_step() == 3
  ckpt.save(5, variables, train_state, _config())  # the clean-up started on open is awaited by a save
  ckpt.close()
  assert not os.path.exists(partial)
  assert sorted(os.listdir(ckpt.directory)) == ['3', '5']


def test_corrupt_checkpoint_names_the_problem(tmp_path):
  variables, train_state = _state()
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(2, variables, train_state, _config())
  ckpt.close()
  item = os.path.join(ckpt.directory, '2', 'variables')
  for root, _, files in os.walk(item):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'\x00garbage')
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  # The step record (file sizes and SHA-256) catches it before orbax reads anything.
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'checkpoints/2 is damaged: .*variables/_METADATA has 8 bytes, \d+ were written'):
    ckpt.restore(2, _zeros_like(variables), _zeros_like(train_state))
  # Without a record (a step written by an older version) the decoding error names the step, in clean text.
  os.remove(os.path.join(ckpt.directory, '2', checkpoint.STEP_RECORD))
  with pytest.raises(checkpoint.CheckpointError, match=r'checkpoints/2 is damaged or incomplete') as error:
    ckpt.restore(2, _zeros_like(variables), _zeros_like(train_state))
  assert '<bound method' not in str(error.value) and ' object at 0x' not in str(error.value)
  ckpt.close()


def test_model_mismatch_names_the_field(tmp_path):
  variables, train_state = _state()
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, variables, train_state, _config())
  with pytest.raises(checkpoint.CheckpointError, match=r"config.model.backbone: checkpoint 'mobilenet_v2'"):
    ckpt.restore(1, variables, train_state, _config(backbone='xception_65'))
  ckpt.close()


def test_restore_with_orbax_alone(tmp_path):
  """The README snippet: no deeplab_jax import, one CPU device, numpy arrays back."""
  variables, train_state = _state()
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(9, variables, train_state, _config())
  ckpt.close()
  snippet = textwrap.dedent(f"""
      import orbax.checkpoint as ocp
      manager = ocp.CheckpointManager({ckpt.directory!r})
      restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
          variables=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
      variables, config = restored['variables'], restored['config']
      print(config['model']['backbone'], variables['params']['logits/semantic']['bias'].tolist())
  """)
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', snippet], env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  expected = np.asarray(variables['params']['logits/semantic']['bias']).tolist()
  assert out.stdout.split()[0] == 'mobilenet_v2'
  np.testing.assert_allclose(eval(out.stdout.split(' ', 1)[1]), expected)


def test_load_pretrained_backbone_scope_and_report(tmp_path):
  variables, train_state = _state(num_classes=3)
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(4, variables, train_state, _config())
  ckpt.close()
  target, _ = _state(num_classes=5, seed=1)
  target['params']['aspp'] = {'aspp0': {'kernel': jnp.ones((1, 1, 4, 2))}}
  # Half the model loads here: accept it (min_loaded_fraction=0) to check the report.
  loaded, report = checkpoint.load_pretrained(str(tmp_path), target, scope='all', min_loaded_fraction=0.0)
  assert 'params/MobilenetV2/Conv/kernel' in report['loaded']
  assert 'batch_stats/MobilenetV2/Conv/BatchNorm/var' in report['loaded']
  assert report['new'] == ['params/aspp/aspp0/kernel']
  skipped = dict(report['skipped'])
  assert 'shape (1, 1, 4, 3) in checkpoint' in skipped['params/logits/semantic/kernel']
  np.testing.assert_array_equal(loaded['params']['MobilenetV2']['Conv']['kernel'],
                                variables['params']['MobilenetV2']['Conv']['kernel'])
  np.testing.assert_array_equal(loaded['params']['logits/semantic']['bias'],
                                target['params']['logits/semantic']['bias'])
  # Backbone scope: same-shaped head weights stay as initialised.
  target3, _ = _state(num_classes=3, seed=2)
  loaded, report = checkpoint.load_pretrained(str(tmp_path), target3, scope='backbone',
                                              backbone_scope='MobilenetV2')
  assert dict(report['skipped'])['params/logits/semantic/bias'] == "outside scope 'backbone' (MobilenetV2)"
  assert report['loaded_fraction'] == 1.0 and report['in_scope'] == 3  # the backbone's kernel, mean, var
  np.testing.assert_array_equal(loaded['params']['logits/semantic']['bias'],
                                target3['params']['logits/semantic']['bias'])
  assert loaded['params']['MobilenetV2']['Conv']['kernel'].sharding.is_fully_replicated


def test_load_pretrained_errors(tmp_path):
  variables, _ = _state()
  with pytest.raises(checkpoint.CheckpointError, match='no such directory'):
    checkpoint.load_pretrained(str(tmp_path / 'missing'), variables)
  with pytest.raises(checkpoint.CheckpointError, match='holds no orbax checkpoint'):
    checkpoint.load_pretrained(str(tmp_path), variables)
  with pytest.raises(ValueError, match='init_from_scope'):
    checkpoint.load_pretrained(str(tmp_path), variables, scope='head')
  with pytest.raises(ValueError, match=r'backbone_scope\(config.model\)'):
    checkpoint.load_pretrained(str(tmp_path), variables, scope='backbone')
