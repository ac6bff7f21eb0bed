"""Fault injection: the accidents of a long run (bad files, damaged checkpoints, divergence, a full disk, two
runs on one workdir) are detected, named and survived.

The train-loop cases (disk full during training, SIGTERM and resume, a diverging run, two runs) use the
pieces tested here through `deeplab_jax.train`.
"""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax
from PIL import Image
import pytest

from deeplab_jax import checkpoint
from deeplab_jax import datasets
from deeplab_jax import run_lock
from deeplab_jax.convert import common as convert_common
from deeplab_jax.convert import flatbuffer
from deeplab_jax.convert import pytorch
from deeplab_jax.datasets import archives
from deeplab_jax.datasets import common
from deeplab_jax.datasets import voc
import tiny_run
from datasets_test import _dataset_config  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOC_SUBSET = 'voc2012_train_subset'


# ------------------------------------------------------------------------------------------------ datasets

def _voc_ids(shared_data, count):
  return (shared_data / VOC_SUBSET / 'ImageSets/Segmentation/train.txt').read_text().split()[:count]


def _truncate(path, keep_fraction=0.5):
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep_fraction)])


def _prepared_versions(data_dir):
  """Completed TFDS dataset directories (`.../<version>/dataset_info.json`) under `data_dir`."""
  return [root for root, _, files in os.walk(data_dir) if 'dataset_info.json' in files]


def test_folder_preparation_names_every_bad_file_then_builds_when_fixed(tmp_path, shared_data):
  ids = _voc_ids(shared_data, 3)
  root = tmp_path / 'mydata'
  for split in ('train', 'val'):
    (root / split / 'images').mkdir(parents=True)
    (root / split / 'masks').mkdir(parents=True)
    for image_id in ids:
      shutil.copy(shared_data / VOC_SUBSET / 'JPEGImages' / f'{image_id}.jpg', root / split / 'images')
      shutil.copy(shared_data / VOC_SUBSET / 'SegmentationClass' / f'{image_id}.png', root / split / 'masks')
  truncated_jpeg = root / 'train/images' / f'{ids[0]}.jpg'
  _truncate(truncated_jpeg)  # opens fine (the header is intact); only a full decode fails
  with Image.open(truncated_jpeg) as image:
    assert image.size  # what a header-only check would accept
  empty_mask = root / 'train/masks' / f'{ids[1]}.png'
  empty_mask.write_bytes(b'')
  garbage_mask = root / 'val/masks' / f'{ids[2]}.png'
  garbage_mask.write_bytes(b'not a png at all')
  config = _dataset_config('folder', tmp_path, manual_dir=str(root), num_classes=21)
  with pytest.raises(common.BadFilesError) as error:
    datasets.get_builder(config).download_and_prepare()
  message = str(error.value)
  assert error.value.problems == {
      str(truncated_jpeg): error.value.problems[str(truncated_jpeg)],
      str(empty_mask): 'empty file (0 bytes)',
      str(garbage_mask): "not an image PIL can read (16 bytes starting b'not a pn')"}
  assert error.value.problems[str(truncated_jpeg)].startswith('truncated (image file is truncated')
  assert message.startswith("Dataset 'folder': 3 source file(s) cannot be decoded or used")
  for path in (truncated_jpeg, empty_mask, garbage_mask):
    assert f'  - {path}: ' in message
  assert not _prepared_versions(tmp_path / 'tfds')  # nothing half-written is left to be read

  for split, image_id in (('train', ids[0]), ('train', ids[1]), ('val', ids[2])):
    shutil.copy(shared_data / VOC_SUBSET / 'JPEGImages' / f'{image_id}.jpg', root / split / 'images')
    shutil.copy(shared_data / VOC_SUBSET / 'SegmentationClass' / f'{image_id}.png', root / split / 'masks')
  builder = datasets.get_builder(config)
  builder.download_and_prepare()
  example = builder.as_data_source('train')[0]
  name = example['image_id'].decode()
  with Image.open(shared_data / VOC_SUBSET / 'JPEGImages' / f'{name}.jpg') as original:
    np.testing.assert_array_equal(example['image'], np.array(original))  # good files are stored as before


def test_voc_archive_preparation_names_the_truncated_jpeg_inside_the_tar(tmp_path, shared_data):
  ids = _voc_ids(shared_data, 4)
  manual = tmp_path / 'manual'
  manual.mkdir()
  archive = manual / voc.VOC_ARCHIVE
  with tarfile.open(archive, 'w') as tar:
    for index, image_id in enumerate(ids):
      jpeg = (shared_data / VOC_SUBSET / 'JPEGImages' / f'{image_id}.jpg').read_bytes()
      if index == 2:
        jpeg = jpeg[:len(jpeg) // 3]
      for name, data in ((f'JPEGImages/{image_id}.jpg', jpeg), (
          f'SegmentationClass/{image_id}.png',
          (shared_data / VOC_SUBSET / 'SegmentationClass' / f'{image_id}.png').read_bytes())):
        info = tarfile.TarInfo(f'VOCdevkit/VOC2012/{name}')
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    for split, split_ids in (('train', ids[:3]), ('val', ids[3:])):
      data = ('\n'.join(split_ids) + '\n').encode()
      info = tarfile.TarInfo(f'VOCdevkit/VOC2012/ImageSets/Segmentation/{split}.txt')
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  builder = datasets.get_builder(_dataset_config('voc2012_segmentation', tmp_path, manual_dir=str(manual),
                                                 builder_config='voc_only'))
  with pytest.raises(common.BadFilesError) as error:
    builder.download_and_prepare()
  location = f'{archive}:VOCdevkit/VOC2012/JPEGImages/{ids[2]}.jpg'
  # Named once although the image is in two splits (train and trainval).
  assert list(error.value.problems) == [location]
  assert 'truncated (image file is truncated' in error.value.problems[location]


def test_damaged_archive_and_sbd_mat_are_named(tmp_path, shared_data):
  manual = tmp_path / 'manual'
  sbd_dir = tmp_path / 'sbd' / 'benchmark_RELEASE/dataset/cls'
  sbd_dir.mkdir(parents=True)
  (sbd_dir / 'x.mat').write_bytes(os.urandom(4096))
  manual.mkdir()
  with tarfile.open(manual / voc.SBD_ARCHIVE, 'w:gz') as tgz:
    tgz.add(tmp_path / 'sbd' / 'benchmark_RELEASE', 'benchmark_RELEASE')
  _truncate(manual / voc.SBD_ARCHIVE, 0.6)
  with pytest.raises(archives.DamagedArchiveError,
                     match=rf'{manual}/benchmark.tgz cannot be read .* truncated or damaged'):
    archives.open_tree(str(manual), voc.SBD_ARCHIVE, voc.SBD_FOLDER, voc.SBD_FOLDER + '/')
  with pytest.raises(common.BadFileError, match=r'^cls/x.mat: cannot be read as a MATLAB file'):
    voc.read_sbd_mat((sbd_dir / 'x.mat').read_bytes(), 'cls/x.mat')
  with pytest.raises(common.BadFileError, match=r'^m.png: empty file \(0 bytes\)$'):
    common.decode_mask(b'', 'm.png')


# ------------------------------------------------------------------------------------------------- convert

def test_truncated_or_garbage_tflite_is_named(tmp_path, shared_data):
  source = (shared_data / 'official_tflite' / 'deeplabv3_mnv2_dm05_pascal_quant.tflite').read_bytes()
  truncated = tmp_path / 'model.tflite'
  truncated.write_bytes(source[:len(source) // 2])
  with pytest.raises(convert_common.ConversionError,
                     match=rf'^{truncated} is truncated or not a valid TFLite file '
                           rf'\({len(source) // 2} bytes; struct.error while parsing'):
    flatbuffer.read_tflite(str(truncated))
  garbage = tmp_path / 'garbage.tflite'
  garbage.write_bytes(b'\x00' * 64)
  with pytest.raises(convert_common.ConversionError, match=rf'^{garbage} is not a TFLite flatbuffer'):
    flatbuffer.read_tflite(str(garbage))
  assert len(flatbuffer.read_tflite(str(shared_data / 'official_tflite' /
                                        'deeplabv3_mnv2_dm05_pascal_quant.tflite')).tensors) > 100


def test_garbage_state_dicts_are_named_before_any_package_is_needed(tmp_path):
  garbage = tmp_path / 'weights.bin'
  garbage.write_bytes(b'<html>404 Not Found</html>')
  with pytest.raises(convert_common.ConversionError,
                     match=rf"^{garbage} is not a PyTorch state dict: torch.save files start with a zip"):
    pytorch.load_state_dict(str(garbage))
  empty = tmp_path / 'weights.pth'
  empty.write_bytes(b'')
  with pytest.raises(convert_common.ConversionError, match=rf'^{empty} is empty \(0 bytes\)'):
    pytorch.load_state_dict(str(empty))
  not_safetensors = tmp_path / 'weights.safetensors'
  not_safetensors.write_bytes(os.urandom(100))
  with pytest.raises(convert_common.ConversionError, match=rf'^{not_safetensors} is not a safetensors file'):
    pytorch.load_state_dict(str(not_safetensors))


# ---------------------------------------------------------------------------------------------- run lock

_HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from deeplab_jax import run_lock
    with run_lock.hold(sys.argv[1]):
      print('locked', flush=True)
      time.sleep(600)
""")


def _start_holder(workdir):
  holder = subprocess.Popen([sys.executable, '-c', _HOLD_LOCK, str(workdir), 'marker-arg'], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == 'locked'
  return holder


def test_second_run_on_a_locked_workdir_fails_naming_the_holder(tmp_path):
  holder = _start_holder(tmp_path)
  try:
    with pytest.raises(run_lock.WorkdirLockedError) as error:
      with run_lock.hold(str(tmp_path)):
        pytest.fail('entered a workdir held by another process')
    message = str(error.value)
    assert f'The workdir {tmp_path} is in use by another run (pid {holder.pid} on host ' in message
    assert 'marker-arg' in message and f'{tmp_path}/run.lock' in message
    assert run_lock.read_holder(str(tmp_path)).pid == holder.pid
  finally:
    holder.kill()
    holder.wait()


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path):
  holder = _start_holder(tmp_path)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  assert run_lock.read_holder(str(tmp_path)).pid == holder.pid  # the killed run's record is still there
  with run_lock.hold(str(tmp_path)) as lock:
    assert lock.previous.pid == holder.pid
    assert run_lock.read_holder(str(tmp_path)).pid == os.getpid()
  assert not os.path.exists(tmp_path / run_lock.LOCK_FILE)  # released and removed


def test_lock_without_flock_uses_the_file_and_detects_dead_holders(tmp_path, monkeypatch):
  def no_flock(fd, operation):
    raise OSError(38, 'Function not implemented')  # ENOSYS, as some network file systems answer
  monkeypatch.setattr(run_lock.fcntl, 'flock', no_flock)
  finished = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True,
                            text=True, check=True)
  dead = run_lock.dataclasses.replace(run_lock.Holder.current(), pid=int(finished.stdout), process_start=None)
  (tmp_path / run_lock.LOCK_FILE).write_text(json.dumps(run_lock.dataclasses.asdict(dead)))
  with run_lock.hold(str(tmp_path)) as lock:
    assert lock.previous.pid == dead.pid
    assert os.path.exists(tmp_path / f'{run_lock.LOCK_FILE}.stale-{dead.pid}')  # kept, not deleted
    with pytest.raises(run_lock.WorkdirLockedError, match=f'pid {os.getpid()} on host'):
      run_lock.RunLock(str(tmp_path)).acquire()  # a live holder (this process) is never taken over
  assert not os.path.exists(tmp_path / run_lock.LOCK_FILE)


# ------------------------------------------------------------------------------------------- checkpoints

def _config(num_classes=3):
  return ml_collections.ConfigDict({'model': {'backbone': 'mobilenet_v2', 'num_classes': num_classes},
                                    'train': {'crop_size': (33, 33)}})


def _replicated():
  return NamedSharding(Mesh(np.asarray(jax.devices()), ('data',)), P())


def _state(scale=1.0, num_classes=3):
  """Tiny variables + SGD-momentum state, replicated over the test's 8 devices; values depend on `scale`."""
  params = {'MobilenetV2': {'Conv': {'kernel': scale * np.arange(3 * 3 * 3 * 8, dtype=np.float32).reshape(
      3, 3, 3, 8)}},
            'logits/semantic': {'kernel': np.full((1, 1, 8, num_classes), scale, np.float32),
                                'bias': np.full((num_classes,), -scale, np.float32)}}
  batch_stats = {'MobilenetV2': {'Conv/BatchNorm': {'mean': np.full(8, scale, np.float32),
                                                    'var': np.full(8, 2 * scale, np.float32)}}}
  variables = jax.device_put({'params': params, 'batch_stats': batch_stats}, _replicated())
  opt_state = jax.tree.map(lambda x: x + scale, optax.sgd(0.1, momentum=0.9).init(variables['params']))
  return variables, {'step': jax.device_put(jnp.int32(int(scale)), _replicated()), 'opt_state': opt_state}


def _target():
  variables, train_state = _state(0.0)
  return jax.tree.map(jnp.zeros_like, variables), jax.tree.map(jnp.zeros_like, train_state)


def _saved(tmp_path, steps=(1, 2), **kwargs):
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=True, **kwargs)
  for step in steps:
    ckpt.save(step, *_state(float(step)), _config())
  ckpt.wait()
  return ckpt


def _largest_data_file(step_dir):
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, 'variables'))
           for name in names if '/d/' in os.path.join(root, name)]
  return max(files, key=os.path.getsize)


def _listing(directory):
  return sorted(os.path.relpath(os.path.join(root, name), directory)
                for root, _, names in os.walk(directory) for name in names)


@pytest.mark.parametrize('damage', ['truncate', 'flip_16_bytes', 'garbage_record'])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, caplog):
  ckpt = _saved(tmp_path)
  step_dir = os.path.join(ckpt.directory, '2')
  data_file = _largest_data_file(step_dir)
  if damage == 'truncate':
    with open(data_file, 'r+b') as f:
      f.truncate(os.path.getsize(data_file) // 2)
  elif damage == 'flip_16_bytes':
    with open(data_file, 'r+b') as f:
      f.seek(os.path.getsize(data_file) // 2)
      chunk = bytearray(f.read(16))
      f.seek(-16, 1)
      f.write(bytes(b ^ 0xFF for b in chunk))
  else:
    with open(os.path.join(step_dir, checkpoint.STEP_RECORD), 'w') as f:
      f.write('{"files": ')
  before = _listing(tmp_path)
  variables, train_state = _target()
  with caplog.at_level('WARNING'):
    result = ckpt.restore_latest_intact(variables, train_state, _config())
  ckpt.close()
  assert result.step == 1 and [s for s, _ in result.skipped] == [2] and result.set_aside == {}
  reason = result.skipped[0][1]
  expected = {'truncate': f'{data_file} has {os.path.getsize(data_file)} bytes',
              'flip_16_bytes': f'{data_file} differs from what was written (SHA-256 mismatch',
              'garbage_record': 'integrity record'}[damage]
  assert reason.startswith('damaged: ') and expected in reason
  assert f'Skipping checkpoint {step_dir}:' in caplog.text and '<bound method' not in caplog.text
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               (result.variables, result.train_state), _state(1.0))
  assert _listing(tmp_path) == before  # nothing deleted or moved
  with pytest.raises(checkpoint.CheckpointError, match=r'checkpoints/2 is damaged: .*Nothing was deleted'):
    checkpoint.Checkpointer(str(tmp_path), read_only=True).restore(2, variables)


def test_resuming_sets_damaged_steps_aside_and_can_write_them_again(tmp_path):
  ckpt = _saved(tmp_path, steps=(1, 2, 3))
  with open(_largest_data_file(os.path.join(ckpt.directory, '3')), 'r+b') as f:
    f.truncate(10)
  result = ckpt.restore_latest_intact(*_target(), set_aside_skipped=True)
  assert result.step == 2 and list(result.set_aside) == [3]
  moved = result.set_aside[3]
  assert moved.startswith(os.path.join(str(tmp_path), checkpoint.SET_ASIDE_SUBDIR, '3-'))
  assert 'truncated or overwritten' in open(os.path.join(moved, 'WHY_SET_ASIDE.txt')).read()
  assert os.path.isdir(os.path.join(moved, 'variables'))
  assert ckpt.all_steps() == [1, 2]
  ckpt.save(3, *_state(33.0), _config())  # the resumed run writes step 3 afresh
  ckpt.close()
  ckpt = checkpoint.Checkpointer(str(tmp_path), read_only=True)
  assert ckpt.verify(3) is None
  restored, _ = ckpt.restore(3, _target()[0])
  np.testing.assert_array_equal(restored['params']['logits/semantic']['bias'], np.full(3, -33.0))


def test_every_step_damaged_raises_listing_each_and_deletes_nothing(tmp_path):
  ckpt = _saved(tmp_path)
  for step in (1, 2):
    with open(_largest_data_file(os.path.join(ckpt.directory, str(step))), 'r+b') as f:
      f.truncate(5)
  before = _listing(tmp_path)
  with pytest.raises(checkpoint.CheckpointError, match=r'No intact checkpoint in .*step 2: damaged: .*; '
                                                       r'step 1: damaged: .*Nothing was deleted'):
    ckpt.restore_latest_intact(*_target(), set_aside_skipped=True)
  ckpt.close()
  assert _listing(tmp_path) == before


def test_intact_step_that_does_not_fit_the_target_is_not_skipped(tmp_path):
  ckpt = _saved(tmp_path)
  variables, _ = _target()
  adam_state = {'step': jnp.int32(0), 'opt_state': optax.adam(0.1).init(variables['params'])}
  with pytest.raises(checkpoint.CheckpointError, match=r'checkpoints/2 is damaged or incomplete'):
    ckpt.restore_latest_intact(variables, adam_state, set_aside_skipped=True)
  with pytest.raises(checkpoint.CheckpointError, match=r"config.model.num_classes: checkpoint 3, now 5"):
    ckpt.restore_latest_intact(variables, config=_config(num_classes=5))
  assert ckpt.all_steps() == [1, 2]  # a different optimizer or model is a config error, not damage
  ckpt.close()


def test_save_refuses_non_finite_state_and_names_the_arrays(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, *_state(1.0), _config())
  variables, train_state = _state(2.0)
  variables['params']['logits/semantic']['bias'] = variables['params']['logits/semantic']['bias'].at[1].set(
      jnp.nan)
  with pytest.raises(checkpoint.NonFiniteStateError,
                     match=r'Refusing to save step 2 .*: 1 arrays hold NaN or Inf, e.g. '
                           r'variables/params/logits/semantic/bias\. .*last finite checkpoint is step 1'):
    ckpt.save(2, variables, train_state, _config())
  variables, train_state = _state(2.0)
  train_state['opt_state'] = jax.tree.map(lambda x: x * jnp.inf, train_state['opt_state'])
  with pytest.raises(checkpoint.NonFiniteStateError,
                     match=r'3 arrays hold NaN or Inf, e.g. train_state/opt_state/0/trace/MobilenetV2/Conv/'):
    ckpt.save(2, variables, train_state, _config())
  assert ckpt.all_steps() == [1]
  ckpt.close()


def test_mark_diverged_makes_the_earlier_step_the_trusted_one(tmp_path):
  ckpt = _saved(tmp_path, steps=(2, 4, 6), keep=5)
  assert ckpt.mark_diverged(5) == [4, 6]  # step 4's weights gave the non-finite loss of step 5
  assert ckpt.latest_step() == 2 and ckpt.newest_trusted_step() == 2 and ckpt.all_steps() == [2, 4, 6]
  ckpt.close()
  # The record persists: a rerun (with a lower learning rate) starts from step 2.
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=5)
  why = 'the loss was not finite at step 5'
  assert ckpt.suspect_steps() == {4: why, 6: why}
  result = ckpt.restore_latest_intact(*_target(), set_aside_skipped=True)
  assert result.step == 2 and [s for s, _ in result.skipped] == [6, 4]
  assert result.skipped[0][1] == 'suspect: the loss was not finite at step 5'
  assert ckpt.all_steps() == [2] and ckpt.suspect_steps() == {}
  assert sorted(os.listdir(tmp_path / checkpoint.SET_ASIDE_SUBDIR))[0].startswith('4-')
  ckpt.save(4, *_state(4.5), _config())
  ckpt.wait()
  assert ckpt.latest_step() == 4 and ckpt.newest_trusted_step() == 4
  ckpt.close()


def test_retention_keeps_latest_and_best_by_the_step_records(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  for step, miou in [(1, 0.5), (2, 0.9), (3, None), (4, 0.6), (5, None)]:
    ckpt.save(step, *_state(float(step)), _config(), None if miou is None else {'miou': miou})
  ckpt.close()
  assert ckpt.all_steps() == [2, 4, 5] and ckpt.best_step() == 2
  assert ckpt.metrics(4) == {'miou': 0.6}
  # A garbage step record only loses that step's metric; the directory still opens.
  with open(os.path.join(ckpt.directory, '2', checkpoint.STEP_RECORD), 'w') as f:
    f.write('garbage')
  assert checkpoint.Checkpointer(str(tmp_path), read_only=True).best_step() == 4


_FILL_DISK = textwrap.dedent("""
    import os, resource, signal, sys, time
    import jax.numpy as jnp, ml_collections, numpy as np
    from deeplab_jax import checkpoint
    workdir, limit = sys.argv[1], int(sys.argv[2])
    if limit:  # no tmpfs: the kernel fails writes beyond `limit` bytes per file (EFBIG)
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
      resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    config = ml_collections.ConfigDict({'model': {'backbone': 'mobilenet_v2'}})
    ckpt = checkpoint.Checkpointer(workdir, keep=1)
    small = {'params': {'w': np.ones(10, np.float32)}, 'batch_stats': {}}
    noise = np.random.default_rng(0).normal(size=400_000).astype(np.float32)  # 1.6 MB, incompressible
    big = {'params': {'w': noise}, 'batch_stats': {}}
    ckpt.save(1, small, {'step': jnp.int32(1)}, config)
    ckpt.save(2, big, {'step': jnp.int32(2)}, config)  # returns at once; the write fails in the background
    try:
      for _ in range(600):  # what a train loop calls at every log step: raises once the write has failed
        ckpt.check_for_errors()
        time.sleep(0.1)
      ckpt.close()
    except checkpoint.CheckpointWriteError as e:
      print('ERROR', e, flush=True)
      ckpt.close()  # the failure is reported once; closing does not hang or raise again
      sys.exit(3)
""")


def test_full_disk_stops_with_the_path_and_keeps_the_last_checkpoint(tmp_path):
  workdir = tmp_path / 'small'
  workdir.mkdir()
  mounted = os.geteuid() == 0 and subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(workdir)], capture_output=True).returncode == 0
  try:
    out = subprocess.run([sys.executable, '-c', _FILL_DISK, str(workdir), '0' if mounted else '200000'],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''))
    assert out.returncode == 3, out.stdout + out.stderr[-3000:]
    message = out.stdout.split('ERROR ', 1)[1]
    assert message.startswith(f'Writing checkpoint {workdir}/checkpoints/2 failed: ')
    assert ('No space left on device' if mounted else 'File too large') in message
    assert f'The earlier checkpoints [1] in {workdir}/checkpoints are intact' in message
    ckpt = checkpoint.Checkpointer(str(workdir), read_only=True)
    assert ckpt.all_steps() == [1] and ckpt.verify(1) is None
    variables, _ = ckpt.read_variables(1)
    np.testing.assert_array_equal(variables['params']['w'], np.ones(10, np.float32))
    ckpt.close()
  finally:
    if mounted:  # busy for a moment if a thread of this process still holds a file there (seen once in CI)
      for _ in range(20):
        if subprocess.run(['umount', str(workdir)], capture_output=True).returncode == 0:
          break
        time.sleep(0.25)
      else:
        subprocess.run(['umount', '--lazy', str(workdir)], check=True)  # detach now, freed once released


def test_error_text_is_clean():
  raw = ValueError('DATA_LOSS: Error reading "params.w/0": bad node <bound method pybind11_detail_function_'
                   'record_v1_system_libstdcpp_gxx_abi_1xxx.__call__ of <tensorstore.Spec object at 0x7f3a>> '
                   '[tensorstore_spec=\'{"driver": "zarr"}\']\nmore detail')
  assert checkpoint.error_text(raw) == 'ValueError: DATA_LOSS: Error reading "params.w/0": bad node'


# --------------------------------------------------------------------------------------------- init_from

def _pretrained(tmp_path, num_classes=3):
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'pretrained'), async_save=False)
  ckpt.save(1, *_state(7.0, num_classes=num_classes), _config(num_classes))
  ckpt.close()
  return str(tmp_path / 'pretrained')


def test_load_pretrained_below_the_fraction_lists_what_did_not_load(tmp_path):
  path = _pretrained(tmp_path)
  other_model = {'params': {'xception_65': {'entry_flow/conv1_1': {'kernel': jnp.zeros((3, 3, 3, 32))}},
                            'logits/semantic': {'kernel': jnp.zeros((1, 1, 8, 3)),
                                                'bias': jnp.zeros((3,))}},
                 'batch_stats': {}}
  with pytest.raises(checkpoint.PretrainedLoadError) as error:
    checkpoint.load_pretrained(path, other_model, min_loaded_fraction=0.9)
  message = str(error.value)
  assert 'loaded only 2 of the 3 model variables in scope \'all\' (66.7%, below ' \
         'config.init_from_min_fraction=0.9)' in message
  assert '  params/xception_65/entry_flow/conv1_1/kernel: not in the checkpoint' in message
  assert 'The checkpoint also holds 3 variables this model lacks, e.g. batch_stats/MobilenetV2' in message
  assert error.value.report['loaded'] == ['params/logits/semantic/kernel', 'params/logits/semantic/bias']
  # Backbone scope: the fraction counts the backbone's variables only.
  with pytest.raises(checkpoint.PretrainedLoadError) as error:
    checkpoint.load_pretrained(path, other_model, scope='backbone', backbone_scope='xception_65')
  assert str(error.value).splitlines()[1:2] == ['  params/xception_65/entry_flow/conv1_1/kernel: not in the '
                                                'checkpoint']  # the heads, outside the scope, are not listed
  assert "loaded only 0 of the 1 model variables in scope 'backbone'" in str(error.value)
  _, report = checkpoint.load_pretrained(path, other_model, min_loaded_fraction=0.5)
  assert report['loaded_fraction'] == pytest.approx(2 / 3)


def test_load_pretrained_into_shape_structs_fills_the_rest_from_init_variables(tmp_path):
  """`--mode=eval` with init_from: targets are ShapeDtypeStructs; a 5-class model on a 3-class checkpoint."""
  path = _pretrained(tmp_path, num_classes=3)
  initialised, _ = _state(0.5, num_classes=5)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_replicated()), initialised)
  calls = []

  def init_variables():
    calls.append(1)
    return initialised

  variables, report = checkpoint.load_pretrained(path, target, min_loaded_fraction=0.5,
                                                 init_variables=init_variables)
  assert calls == [1]
  assert sorted(dict(report['skipped'])) == ['params/logits/semantic/bias', 'params/logits/semantic/kernel']
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(variables))
  assert jax.tree.structure(variables) == jax.tree.structure(initialised)
  np.testing.assert_array_equal(variables['params']['logits/semantic']['bias'], np.full(5, -0.5))  # from init
  np.testing.assert_array_equal(variables['batch_stats']['MobilenetV2']['Conv/BatchNorm']['var'],
                                np.full(8, 14.0))  # from the checkpoint
  assert variables['params']['MobilenetV2']['Conv']['kernel'].sharding.is_equivalent_to(_replicated(), 4)
  with pytest.raises(checkpoint.CheckpointError, match=r'lacks 2 variables .* no init_variables was given'):
    checkpoint.load_pretrained(path, target, min_loaded_fraction=0.5)


def test_load_pretrained_skips_a_damaged_latest_step_of_a_run(tmp_path, caplog):
  ckpt = _saved(tmp_path / 'run')
  with open(_largest_data_file(os.path.join(ckpt.directory, '2')), 'r+b') as f:
    f.truncate(10)
  ckpt.close()
  with caplog.at_level('WARNING'):
    variables, report = checkpoint.load_pretrained(str(tmp_path / 'run'), _target()[0])
  assert report['loaded_fraction'] == 1.0 and 'using step 1; the newer steps [2] are damaged' in caplog.text
  np.testing.assert_array_equal(variables['params']['logits/semantic']['bias'], np.full(3, -1.0))
  with pytest.raises(checkpoint.CheckpointError, match=r'checkpoints/2.* is damaged: .* has 10 bytes'):
    checkpoint.load_pretrained(os.path.join(ckpt.directory, '2'), _target()[0])


# ------------------------------------------------------------------------------------- the training loop

def _main(args, env_devices=1, **popen):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={env_devices} --xla_backend_optimization_level=0')
  return subprocess.Popen([sys.executable, '-m', 'deeplab_jax.main', *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
  """The tiny run's synthetic scenes, prepared once for this module's runs."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  from deeplab_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  input_pipeline.load_dataset(tiny_run.config(data_dir))
  return data_dir


def _mount_tmpfs(path, size):
  path.mkdir(parents=True)
  try:
    subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)], check=True,
                   capture_output=True, timeout=30)
    return True
  except (OSError, subprocess.SubprocessError):
    return False


@pytest.mark.slow
def test_full_disk_during_training_exits_naming_the_path_and_keeps_the_last_checkpoint(tmp_path, tiny_data):
  workdir = tmp_path / 'small_disk' / 'run'
  mounted = _mount_tmpfs(tmp_path / 'small_disk', '3m')
  popen = {}
  if not mounted:  # no mount permission: every file write past 1.5 MB fails instead (EFBIG).
    import resource  # pylint: disable=g-import-not-at-top
    popen['preexec_fn'] = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1_500_000, 1_500_000))
  try:
    process = _main(tiny_run.flags(tiny_data, str(workdir), train__num_steps=400,
                                   train__checkpoint_every_steps=2, train__keep_checkpoints=400,
                                   train__eval_every_steps=1000), **popen)
    _, err = process.communicate(timeout=600)  # a hang (the old behaviour) fails here
    assert process.returncode != 0, err[-2000:]
    assert str(workdir) in err and ('No space left on device' in err or 'File too large' in err), err[-3000:]
    ckpt = checkpoint.Checkpointer(str(workdir), read_only=True)
    steps = ckpt.all_steps()
    assert steps and all(ckpt.verify(step) is None for step in steps)  # what was written is intact
    variables, _ = ckpt.read_variables(max(steps))
    assert not checkpoint.nonfinite_leaves(variables)
    ckpt.close()
  finally:
    if mounted:
      subprocess.run(['umount', '-l', str(tmp_path / 'small_disk')], check=False, capture_output=True)


@pytest.mark.slow
def test_sigterm_saves_the_step_reached_and_the_rerun_ends_where_an_uninterrupted_run_does(
    tmp_path, tiny_data):
  steps = dict(train__num_steps=30, train__checkpoint_every_steps=1000, train__log_every_steps=1,
               train__eval_every_steps=1000)
  interrupted = tmp_path / 'interrupted'
  process = _main(tiny_run.flags(tiny_data, str(interrupted), **steps))
  lines = []
  for line in process.stderr:  # absl logs each step; stop the run once it is well under way
    lines.append(line)
    if '] step 3:' in line:
      process.send_signal(signal.SIGTERM)
      break
  _, rest = process.communicate(timeout=300)
  err = ''.join(lines) + rest
  assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
  stopped = [line for line in err.splitlines() if 'Stopped by SIGTERM at step' in line]
  assert stopped, err[-3000:]
  step = int(stopped[-1].split('at step ')[1].split(';')[0])
  assert 3 <= step < 30
  assert checkpoint.Checkpointer(str(interrupted), read_only=True).all_steps() == [step]
  process = _main(tiny_run.flags(tiny_data, str(interrupted), **steps))
  _, err = process.communicate(timeout=600)
  assert process.returncode == 0, err[-3000:]
  assert f'Resuming from {interrupted}/checkpoints/{step}' in err
  # The same run uninterrupted, on the same single device (BatchNorm sums in another order on 8).
  process = _main(tiny_run.flags(tiny_data, str(tmp_path / 'uninterrupted'), **steps))
  _, err = process.communicate(timeout=600)
  assert process.returncode == 0, err[-3000:]
  final = [checkpoint.Checkpointer(str(run), read_only=True).read_variables(30)[0]
           for run in (interrupted, tmp_path / 'uninterrupted')]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), *final)


def test_a_diverging_run_names_a_finite_checkpoint_and_the_rerun_starts_there(tmp_path, tiny_data):
  from deeplab_jax import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  exploding = tiny_run.config(tiny_data, train__base_learning_rate=1e6, train__num_steps=40,
                              train__checkpoint_every_steps=2, train__log_every_steps=1,
                              train__keep_checkpoints=40)
  with pytest.raises(FloatingPointError) as error:
    train.train_and_evaluate(exploding, workdir, run_eval=False)
  message = str(error.value)
  assert 'The training loss became' in message or 'weights became non-finite' in message
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  trusted = ckpt.newest_trusted_step()
  if trusted is None:
    assert 'rerunning starts from the initial weights' in message
  else:
    assert f'rerunning resumes from step {trusted}' in message
    variables, _ = ckpt.read_variables(trusted)
    assert not checkpoint.nonfinite_leaves(variables)
  suspects = sorted(ckpt.suspect_steps())
  assert suspects and all(step not in suspects for step in ([trusted] if trusted is not None else []))
  ckpt.close()
  # Lower the learning rate and rerun: it starts from the trusted step (or afresh) and finishes.
  calm = tiny_run.config(tiny_data, train__num_steps=max(suspects) + 2, train__checkpoint_every_steps=2,
                         train__log_every_steps=1, train__keep_checkpoints=40)
  train.train_and_evaluate(calm, workdir, run_eval=False)
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  variables, _ = ckpt.read_variables(ckpt.latest_step())
  assert ckpt.latest_step() == max(suspects) + 2 and not checkpoint.nonfinite_leaves(variables)
  ckpt.close()


def test_a_second_run_on_a_held_workdir_stops_at_once_naming_the_holder(tmp_path, tiny_data):
  workdir = tmp_path / 'run'
  with run_lock.hold(str(workdir)):
    process = _main(tiny_run.flags(tiny_data, str(workdir)))
    _, err = process.communicate(timeout=300)
  assert process.returncode == 1
  assert str(workdir) in err and f'pid {os.getpid()}' in err, err[-2000:]
  assert 'Traceback' not in err and not os.path.exists(workdir / 'checkpoints' / '2')
