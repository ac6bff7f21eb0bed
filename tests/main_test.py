"""Tests for deeplab_jax.main: the command line, eval mode, and two processes training as one."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from deeplab_jax import checkpoint
from deeplab_jax import input_pipeline
from deeplab_jax import train
import evaluate_test
import tiny_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_main(args, devices, extra_env=None, wait=True):
  xla_flags = f'--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0'
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags, **(extra_env or {}))
  # The tests' persistent compilation cache is per machine: processes of one multi-process run that find
  # different entries in it were seen to wait forever on their first collective.
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  process = subprocess.Popen([sys.executable, '-m', 'deeplab_jax.main', *args], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if not wait:
    return process
  out, err = process.communicate(timeout=300)
  return process.returncode, out, err


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_process(tmp_path):
  """2 processes x 4 CPU devices (jax.distributed, gloo collectives) == 1 process x 8 devices."""
  data_dir = str(tmp_path / 'tfds')
  config = tiny_run.config(data_dir, train__num_steps=2, train__eval_every_steps=2,
                           eval__num_images_to_save=4)
  input_pipeline.load_dataset(config)  # prepare the data once, before two processes read it
  flags = tiny_run.flags(data_dir, str(tmp_path / 'two'), train__num_steps=2, train__eval_every_steps=2,
                         eval__num_images_to_save=4)  # train_and_eval
  address = f'localhost:{_free_port()}'
  # The dropout masks must be the same random bits in both runs: threefry's are whatever the device layout,
  # rbg's (conftest.py's faster choice) are not (with rbg the two runs' updates differed by 2-7%).
  prng = {'JAX_DEFAULT_PRNG_IMPL': 'threefry2x32'}
  processes = [_run_main(flags + ['--num_processes=2', f'--process_id={i}', f'--coordinator_address={address}'],
                         devices=4, extra_env=prng, wait=False) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=300) for p in processes]
  finally:  # a hung pair must not outlive the test
    for process in processes:
      process.kill()
  for process, (_, err) in zip(processes, outputs):
    assert process.returncode == 0, err[-3000:]
  assert 'on 8 devices (2 processes)' in outputs[0][1] + outputs[0][0]

  default_impl = jax.config.jax_default_prng_impl
  jax.config.update('jax_default_prng_impl', prng['JAX_DEFAULT_PRNG_IMPL'])
  try:
    summary = train.train_and_evaluate(config, str(tmp_path / 'one'))
  finally:
    jax.config.update('jax_default_prng_impl', default_impl)
  ckpt_two, ckpt_one = checkpoint.Checkpointer(str(tmp_path / 'two')), checkpoint.Checkpointer(str(tmp_path / 'one'))
  two, _ = ckpt_two.read_variables(2)
  one, _ = ckpt_one.read_variables(2)
  ckpt_two.close()
  ckpt_one.close()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), one, two)
  with open(tmp_path / 'two' / 'eval' / 'step_0000002.json') as f:
    two_summary = json.load(f)
  assert two_summary['num_images'] == 8
  np.testing.assert_allclose(two_summary['confusion'], summary['confusion'], atol=2)
  assert sorted(os.listdir(tmp_path / 'two' / 'predictions' / 'step_0000002')) == ['00.png', '01.png', '02.png', '03.png']


def test_eval_mode_on_a_voc_folder_prints_the_table(tmp_path, shared_data):
  config = evaluate_test.voc_eval_setup(tmp_path, shared_data)
  d = config.dataset
  flags = ['--config=configs/tiny.py', '--mode=eval', f'--workdir={tmp_path / "run"}',
           '--config.model.num_classes=21', '--config.model.depthwise_impl=grouped',
           '--config.dataset.name=voc2012_segmentation', '--config.dataset.builder_config=voc_only',
           '--config.dataset.num_classes=21', f'--config.dataset.manual_dir={d.manual_dir}',
           f'--config.dataset.data_dir={d.data_dir}', '--config.dataset.train_split=train',
           '--config.dataset.eval_split=val', '--config.eval.crop_size=(321, 321)', '--config.eval.batch_size=8']
  code, out, err = _run_main(flags, devices=8)
  assert code == 0, err[-3000:]
  expected = evaluate_test.expected_confusion(shared_data)
  miou = expected[0, 0] / expected.sum() / np.count_nonzero(expected.sum(axis=1))
  assert 'Evaluation of step 12 on voc2012_segmentation/val (3 images' in out
  assert f'{"mIoU":<14}  {100 * miou:7.2f}' in out
  assert 'pixel accuracy' in out and 'tvmonitor' in out
  assert 'process 0 of 1; 8 local / 8 global devices' in err


def test_missing_data_and_bad_values_stop_with_a_message(tmp_path):
  flags = ['--config=configs/tiny.py', f'--workdir={tmp_path / "run"}',
           '--config.dataset.name=voc2012_segmentation', f'--config.dataset.manual_dir={tmp_path / "nothing"}',
           f'--config.dataset.data_dir={tmp_path / "tfds"}', '--config.dataset.num_classes=21',
           '--config.model.num_classes=21']
  code, _, err = _run_main(flags, devices=1)
  assert code != 0
  assert 'VOCtrainval_11-May-2012.tar' in err and str(tmp_path / 'nothing') in err
  code, _, err = _run_main(['--config=configs/tiny.py', f'--workdir={tmp_path / "run"}',
                            '--config.train.batch_size=7'], devices=2)
  assert code != 0 and 'config.train.batch_size=7 must be a multiple of the number of devices (2)' in err
