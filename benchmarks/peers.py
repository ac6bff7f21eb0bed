"""deeplab_jax next to the PyTorch DeepLabs on this machine's CPU, in one run (issue 12).

  python benchmarks/peers.py [--only=xception_infer,xception_train,...] [--repeats=3] [--warmup=1]
      [--rounds=1] [--threads=2] [--json=PATH] [--peers_venv=~/.cache/deeplab_jax/peers_venv]

Every measurement runs in a fresh subprocess, so its peak resident memory (VmHWM) is its own, pinned with
`sched_setaffinity` to the same `--threads` cores: the PyTorch children also call
`torch.set_num_threads(threads)` (and get OMP_NUM_THREADS), the JAX children keep XLA's default thread
pool, which XLA sizes from the cores the process may run on. JAX children see one CPU device (the
8 fake devices of the test suite are removed from XLA_FLAGS). Weights are random, 21 classes; times are
medians of `--repeats` runs after `--warmup` runs (ours after compilation, which is reported apart).
With `--rounds=N` every measurement runs N times, interleaved (all of round 1, then all of round 2, ...), so a
slow spell of a shared machine falls on both sides of a ratio: the table shows the medians of the rounds'
medians (peak memory: the highest round) and prints each round's ratios below it.
The JAX train and pipeline children run with glibc's malloc as `python -m deeplab_jax.main` runs on a
CPU-only machine: with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` where the kernel's transparent huge pages are
`madvise` (deeplab_jax/hugepages.py); the inference children and the PyTorch children with this process's
environment. A value set when starting this script is kept for every child:
`GLIBC_TUNABLES=glibc.malloc.hugetlb=0` (or `=1`) times all of them without (with) huge pages.

Rows (`--only` takes these names):
  xception_infer   Xception-65 V3+ OS16, batch 1: ours at 513 (configs/voc_xception.py) vs smp
                   DeepLabV3Plus(encoder 'tu-xception65', encoder_output_stride=16) at 512 (smp needs a
                   multiple of 16).
  xception_train   the same models, one train step at batch 2: ours = the library's jitted step
                   (`train.make_train_step`: loss, L2, SGD momentum 0.9, poly schedule, donated state); theirs
                   = train-mode forward, cross-entropy (ignore 255), backward, SGD momentum 0.9 with the
                   recipe's weight decay. Time and peak RSS.
  resnet101_infer  ResNet-101 V3 OS8, batch 1 at 513: ours configs/voc_resnet101_v3.py (an OS16 recipe, built
                   here with `create_model(config.model, output_stride=8)`: rates 12/24/36) vs torchvision
                   deeplabv3_resnet101 (OS8, rates 12/24/36, no aux head).
  resnet101_train  the same, train step at batch 2; time and peak RSS.
  mobilenetv2      ours only: MobileNetV2 V3 OS16 (configs/voc_mobilenetv2.py) at 513, inference b1 and
                   train step b2.
  remat            the two train rows again with config.model.remat=True on our side (backbone units
                   recomputed in the backward pass), step time and peak RSS against the same peers.
  pipeline         ours only: the training input pipeline (`input_pipeline.create_train_iterator`, official
                   augmentation, crop 513, the config's num_workers) over the 330 real VOC images of
                   ../shared/data/voc2012_train_subset, in images/s and per core, next to the images/s the
                   MobileNetV2 train step consumes.

The PyTorch packages live in their own venv (`--peers_venv`), created on first use: torch 2.13.0 (CPU build;
from the PyTorch CPU index when it is reachable, else the configured PyPI index), torchvision 0.28.0, timm
1.0.31 and segmentation-models-pytorch 0.6.0 with --no-deps, plus their pure-Python needs. The PyTorch
children run `benchmarks/peers_torch.py` with that venv's python.
"""
import argparse
import datetime
import importlib
import importlib.metadata
import json
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request

import timing  # benchmarks/timing.py (this folder is sys.path[0] when run as a script)

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # configs/ (parent and children); the children import the library lazily
from deeplab_jax import hugepages  # pylint: disable=wrong-import-position  (no JAX: the host malloc setting)
VOC_SUBSET = REPO.parent / 'shared' / 'data' / 'voc2012_train_subset'
CACHE = pathlib.Path('~/.cache/deeplab_jax').expanduser()
TORCH_CPU_INDEX = 'https://download.pytorch.org/whl/cpu'
TORCH_PIN = 'torch==2.13.0'
PEER_PINS = ('torchvision==0.28.0', 'timm==1.0.31', 'segmentation-models-pytorch==0.6.0')  # with --no-deps
# What torchvision, timm and smp import besides torch (their Requires-Dist without torch/torchvision/timm).
PEER_NEEDS = ('numpy', 'pillow', 'pyyaml', 'huggingface_hub', 'safetensors', 'tqdm')
READY_FILE = 'deeplab_jax_peers_ready.json'
VOC_LAYOUT = ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation/train.txt')

# Each measurement is one subprocess: 'ours' runs configs/<config>.py through the library, 'torch' runs
# peers_torch.py in the peer venv.
MEASUREMENTS = {
    'ours_xception_infer': dict(side='ours', config='voc_xception', mode='infer', size=513, batch=1),
    'smp_xception_infer': dict(side='torch', model='smp_xception65', mode='infer', size=512, batch=1),
    'ours_xception_train': dict(side='ours', config='voc_xception', mode='train', size=513, batch=2),
    'smp_xception_train': dict(side='torch', model='smp_xception65', mode='train', size=512, batch=2,
                               config='voc_xception'),
    'ours_resnet101_infer': dict(side='ours', config='voc_resnet101_v3', mode='infer', size=513, batch=1,
                                 output_stride=8),
    'tv_resnet101_infer': dict(side='torch', model='tv_resnet101', mode='infer', size=513, batch=1),
    'ours_resnet101_train': dict(side='ours', config='voc_resnet101_v3', mode='train', size=513, batch=2,
                                 output_stride=8),
    'tv_resnet101_train': dict(side='torch', model='tv_resnet101', mode='train', size=513, batch=2,
                               config='voc_resnet101_v3'),
    'ours_mobilenetv2_infer': dict(side='ours', config='voc_mobilenetv2', mode='infer', size=513, batch=1),
    'ours_mobilenetv2_train': dict(side='ours', config='voc_mobilenetv2', mode='train', size=513, batch=2),
    'ours_xception_train_remat': dict(side='ours', config='voc_xception', mode='train', size=513, batch=2,
                                      remat=True),
    'ours_resnet101_train_remat': dict(side='ours', config='voc_resnet101_v3', mode='train', size=513,
                                       batch=2, output_stride=8, remat=True),
    'ours_pipeline': dict(side='ours', config='voc_mobilenetv2', mode='pipeline', size=513),
}
ROWS = {  # row name -> the measurements it reads
    'xception_infer': ('ours_xception_infer', 'smp_xception_infer'),
    'xception_train': ('ours_xception_train', 'smp_xception_train'),
    'resnet101_infer': ('ours_resnet101_infer', 'tv_resnet101_infer'),
    'resnet101_train': ('ours_resnet101_train', 'tv_resnet101_train'),
    'mobilenetv2': ('ours_mobilenetv2_infer', 'ours_mobilenetv2_train'),
    'remat': ('ours_xception_train_remat', 'smp_xception_train', 'ours_resnet101_train_remat',
              'tv_resnet101_train'),
    'pipeline': ('ours_pipeline', 'ours_mobilenetv2_train'),
}


# ----------------------------------------------------------------------------------------------------
# Children: one measurement each, printing `RESULT <json>` last.
# ----------------------------------------------------------------------------------------------------


def _ours_model_and_config(spec: dict):
  """The config of `spec['config']` with the spec's overrides, and the model it builds."""
  from deeplab_jax.models import create_model  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{spec["config"]}').get_config()
  config.model.remat = bool(spec.get('remat', False))
  return config, create_model(config.model, output_stride=spec.get('output_stride'))


def _child_ours_infer(spec: dict, warmup: int, repeats: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  config, model = _ours_model_and_config(spec)
  size, batch = spec['size'], spec['batch']
  images = jax.numpy.asarray(np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)), np.float32)
  variables = jax.jit(model.init)(jax.random.key(0), images)
  start = time.perf_counter()
  forward = jax.jit(model.apply).lower(variables, images).compile()
  compile_s = time.perf_counter() - start

  def run():
    logits = jax.block_until_ready(forward(variables, images))
    assert logits.shape == (batch, size, size, config.model.num_classes), logits.shape

  return {**timing.time_runs(run, warmup, repeats), 'compile_s': compile_s}


def ours_train_setup(config, model, batch: int, size: int):
  """`(step_fn, state, batch_arrays)`: the library's jitted train step built as the trainer builds it
  (train.train_and_evaluate / _train_loop) on this process's devices, and one random batch (5% ignored
  pixels). Also used by `gpu_train.py`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from deeplab_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from deeplab_jax import optim  # pylint: disable=g-import-not-at-top
  from deeplab_jax import train  # pylint: disable=g-import-not-at-top
  config.train.batch_size, config.train.crop_size = batch, (size, size)
  mesh = train.create_mesh()
  tx, schedule = optim.create_optimizer(config.train)
  state = train.create_train_state(config, model, tx, mesh)
  step_fn = train.make_train_step(config, model, tx, schedule, mesh)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, config.model.num_classes, (batch, size, size), dtype=np.int32)
  labels[rng.random(labels.shape) < 0.05] = config.dataset.ignore_label
  batch_arrays = input_pipeline.shard_batch(
      {'image': rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32), 'label': labels}, mesh)
  return step_fn, state, batch_arrays


def _child_ours_train(spec: dict, warmup: int, repeats: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  config, model = _ours_model_and_config(spec)
  step_fn, state, batch_arrays = ours_train_setup(config, model, spec['batch'], spec['size'])
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch_arrays).compile()
  compile_s = time.perf_counter() - start
  holder = {'state': state}
  del state  # the step donates it: only the returned state is fed back

  def run():
    holder['state'], step_metrics = compiled(holder['state'], batch_arrays)
    jax.block_until_ready((holder['state'], step_metrics))
    if not np.isfinite(float(step_metrics['total_loss'])):
      raise FloatingPointError(f'{spec["config"]} train loss is {float(step_metrics["total_loss"])}.')

  from deeplab_jax.models import cpu_kernels  # pylint: disable=g-import-not-at-top
  return {**timing.time_runs(run, warmup, repeats), 'compile_s': compile_s, 'steps_done': int(holder['state'].step),
          'cpu_kernels': cpu_kernels.available()}


def _child_ours_pipeline(spec: dict, num_batches: int, voc_dir: str, data_dir: str) -> dict:
  """images/s of `input_pipeline.create_train_iterator` over the VOC subset (config's workers and batch)."""
  from deeplab_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from voc_subset import voc_manual_dir  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{spec["config"]}').get_config()
  d, t = config.dataset, config.train
  root = pathlib.Path(data_dir)
  d.builder_config, d.train_split, d.eval_split = 'voc_only', 'train', 'val'
  d.manual_dir = str(voc_manual_dir(pathlib.Path(voc_dir), root))
  d.data_dir = str(root / 'tfds')
  t.crop_size = (spec['size'], spec['size'])
  start = time.perf_counter()
  dataset = input_pipeline.load_dataset(config)  # prepared once into data_dir, then only opened
  load_s = time.perf_counter() - start
  batches = input_pipeline.create_train_iterator(config, dataset, process_index=0, process_count=1)
  first = next(batches)  # warm-up: starts the workers (they work FIFO, so at most num_workers jobs run ahead)
  assert first['image'].shape == (t.batch_size, *t.crop_size, 3), first['image'].shape
  start = time.perf_counter()
  for _ in range(num_batches):
    next(batches)
  seconds = time.perf_counter() - start
  cores = len(os.sched_getaffinity(0))
  images_per_s = num_batches * t.batch_size / seconds
  return {'images_per_s': images_per_s, 'images_per_s_per_core': images_per_s / cores, 'cores': cores,
          'seconds': seconds, 'images': num_batches * t.batch_size, 'batch_size': t.batch_size,
          'num_workers': d.num_workers, 'prefetch_batches': d.prefetch_batches,
          'num_train_examples': dataset.info.num_train_examples, 'dataset_load_s': load_s,
          'peak_rss_mib': timing.peak_rss_mib()}


def run_child(spec: dict, args) -> dict:
  """The body of an 'ours' subprocess."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.device_count() != 1:
    raise RuntimeError(f'The benchmark child sees {jax.device_count()} devices; it must see one CPU device '
                       '(remove xla_force_host_platform_device_count from XLA_FLAGS).')
  if spec['mode'] == 'infer':
    result = _child_ours_infer(spec, args.warmup, args.repeats)
  elif spec['mode'] == 'train':
    result = _child_ours_train(spec, args.warmup, args.repeats)
  else:
    result = _child_ours_pipeline(spec, args.pipeline_batches, args.voc_dir, args.data_dir)
  result.setdefault('peak_rss_mib', timing.peak_rss_mib())
  result.update(devices=str(jax.devices()), backend=jax.default_backend())
  return result


# ----------------------------------------------------------------------------------------------------
# The peer venv.
# ----------------------------------------------------------------------------------------------------


def _pip(python: pathlib.Path, *pip_args: str) -> None:
  command = [str(python), '-m', 'pip', 'install', '--disable-pip-version-check', *pip_args]
  print('  $ ' + shlex.join(command), flush=True)
  completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if completed.returncode:
    tail = '\n'.join(completed.stdout.splitlines()[-15:])
    raise SystemExit(f'pip failed in the peer venv ({completed.returncode}):\n{tail}\nThe pinned versions '
                     f'are {TORCH_PIN}, {", ".join(PEER_PINS)}; none is replaced by another. Fix the cause '
                     'and rerun (the venv is resumed), or pass --peers_venv=<another folder>.')


def _cpu_index_reachable() -> str:
  """'' when the PyTorch CPU index answers, else why not."""
  try:
    with urllib.request.urlopen(f'{TORCH_CPU_INDEX}/torch/', timeout=15):
      return ''
  except OSError as e:
    return str(getattr(e, 'reason', e))


def peer_versions(python: pathlib.Path) -> dict:
  """Runs `peers_torch.py --versions` in the peer venv (imports everything a measurement imports)."""
  completed = subprocess.run([str(python), str(REPO / 'benchmarks' / 'peers_torch.py'), '--versions'],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  result = _parse_result(completed)
  if 'error' in result:
    raise SystemExit(f'The peer venv {python.parents[1]} does not import torch/torchvision/timm/smp:\n'
                     f'{result["error"]}\nDelete the folder to rebuild it, or pass '
                     '--peers_venv=<another folder>.')
  return result


def ensure_peers_venv(venv: pathlib.Path) -> tuple[pathlib.Path, dict]:
  """The peer venv's python and package versions (checked by importing them); creates the venv once."""
  python = venv / 'bin' / 'python'
  ready = venv / READY_FILE
  if not (ready.exists() and python.exists()):
    print(f'Creating the PyTorch peer venv in {venv} (once; a few minutes).', flush=True)
    subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
    unreachable = _cpu_index_reachable()
    if unreachable:
      print(f'  The PyTorch CPU index {TORCH_CPU_INDEX} is unreachable ({unreachable}); installing '
            f'{TORCH_PIN} from the configured PyPI index instead (the build it gives is printed below).',
            flush=True)
      _pip(python, TORCH_PIN)
    else:
      _pip(python, '--index-url', TORCH_CPU_INDEX, TORCH_PIN)
    _pip(python, '--no-deps', *PEER_PINS)
    _pip(python, *PEER_NEEDS)
    source = f'the configured PyPI index ({TORCH_CPU_INDEX} unreachable)' if unreachable else TORCH_CPU_INDEX
    ready.write_text(json.dumps({'torch_source': source}))
  versions = {**peer_versions(python), **json.loads(ready.read_text())}
  print(f'Peer venv {venv}: {versions}', flush=True)
  return python, versions


# ----------------------------------------------------------------------------------------------------
# The parent: runs the children, prints the table.
# ----------------------------------------------------------------------------------------------------


def _parse_result(completed: subprocess.CompletedProcess) -> dict:
  for line in reversed(completed.stdout.splitlines()):
    if line.startswith('RESULT '):
      return json.loads(line[len('RESULT '):])
  tail = '\n'.join((completed.stderr or completed.stdout or '').splitlines()[-12:])
  return {'error': f'exit status {completed.returncode}:\n{tail}'}


def _ours_env(mode: str) -> dict:
  """The environment of a JAX child: one CPU device, whatever the caller (e.g. the test suite) set.

  Training and the input pipeline get host malloc as `python -m deeplab_jax.main` runs on a CPU-only machine:
  `glibc.malloc.hugetlb=1` where `hugepages.should_reexec` says main restarts with it (a value in this
  process's GLIBC_TUNABLES is kept); inference runs as a user's process or `deeplab_jax.predict` does.
  """
  env = dict(os.environ)
  env.pop('JAX_NUM_CPU_DEVICES', None)
  flags = env.get('XLA_FLAGS', '').split()
  env['XLA_FLAGS'] = ' '.join(f for f in flags if 'xla_force_host_platform_device_count' not in f)
  env['JAX_PLATFORMS'] = 'cpu'
  return hugepages.with_hugepages(env) if mode != 'infer' and hugepages.should_reexec(env) else env


def _torch_env(threads: int) -> dict:
  """The environment of a PyTorch child: OpenMP/MKL sized to the pinned cores."""
  env = dict(os.environ)
  env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
  return env


def measure(name: str, args, cpus: list, peers_python) -> dict:
  """Runs measurement `name` in a fresh subprocess pinned to `cpus`."""
  spec = MEASUREMENTS[name]
  common = ['--warmup', str(args.warmup), '--repeats', str(args.repeats)]
  if spec['side'] == 'ours':
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), '--child', json.dumps(spec),
               '--pipeline_batches', str(args.pipeline_batches), '--voc_dir', str(args.voc_dir),
               '--data_dir', str(args.data_dir), *common]
    env = _ours_env(spec['mode'])
  else:
    command = [str(peers_python), str(REPO / 'benchmarks' / 'peers_torch.py'), '--model', spec['model'],
               '--mode', spec['mode'], '--size', str(spec['size']), '--batch', str(spec['batch']),
               '--threads', str(args.threads), *common]
    if spec['mode'] == 'train':  # the recipe's L2 (ours puts it in the loss) as SGD weight decay
      command += ['--weight_decay', str(_recipe(spec['config']).train.weight_decay)]
    env = _torch_env(args.threads)
  print(f'[{time.strftime("%H:%M:%S")}] {name} ...', end=' ', flush=True)
  start = time.perf_counter()
  completed = subprocess.run(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, preexec_fn=lambda: os.sched_setaffinity(0, cpus))
  result = _parse_result(completed)
  result['wall_s'] = time.perf_counter() - start
  summary = 'FAILED' if 'error' in result else ', '.join(
      f'{key} {result[key]:.3f}' for key in ('median_s', 'compile_s', 'peak_rss_mib', 'images_per_s')
      if result.get(key) is not None)
  if 'times_s' in result:  # each run, to spot a noisy one
    summary += ' (warm-up [{}] runs [{}])'.format(*(' '.join(f'{t:.2f}' for t in result[k])
                                                    for k in ('warmup_s', 'times_s')))
  print(f'{summary} ({result["wall_s"]:.0f} s)', flush=True)
  if 'error' in result:
    print(result['error'], flush=True)
  return result


def combine_rounds(round_results: list) -> dict:
  """One measurement's results from each round -> one: medians of the rounds' figures, the highest peak RSS.

  A round that failed makes the whole measurement failed (its error is kept); `round_median_s` lists the
  rounds' medians and `times_s` / `warmup_s` every run, in round order.
  """
  failed = [r for r in round_results if 'error' in r]
  if failed:
    return {**failed[0], 'rounds': len(round_results)}
  combined = dict(round_results[0])
  for keys, combine in ((('median_s', 'compile_s', 'images_per_s', 'images_per_s_per_core', 'wall_s'),
                         statistics.median), (('peak_rss_mib', 'peak_rss_runs_mib'), max)):
    for key in keys:
      values = [r[key] for r in round_results if r.get(key) is not None]
      if values:
        combined[key] = combine(values)
  for key in ('times_s', 'warmup_s'):
    if all(key in r for r in round_results):
      combined[key] = [t for r in round_results for t in r[key]]
  if all(r.get('median_s') is not None for r in round_results):
    combined['round_median_s'] = [r['median_s'] for r in round_results]
  combined['rounds'] = len(round_results)
  return combined


def round_ratios(rows: list, results: dict) -> list:
  """[(title, [ours/theirs per round])] for the timed pairs among `rows` (needs `round_median_s`)."""
  pairs = [(TITLES[row], *ROWS[row][:2]) for row in rows if row in TITLES]
  if 'remat' in rows:
    pairs += [(title, ours, theirs) for ours, theirs, title in REMAT_PAIRS]
  out = []
  for title, ours, theirs in pairs:
    a, b = (results.get(n, {}).get('round_median_s') for n in (ours, theirs))
    if a and b and len(a) == len(b):
      out.append((title, [x / y for x, y in zip(a, b)]))
  return out


def _recipe(config_name: str):
  """configs/<config_name>.py's config (the files import nothing heavy)."""
  return importlib.import_module(f'configs.{config_name}').get_config()


def machine() -> dict:
  model = 'unknown CPU'
  with open('/proc/cpuinfo') as f:
    for line in f:
      if line.startswith('model name'):
        model = line.split(':', 1)[1].strip()
        break
  with open('/proc/meminfo') as f:
    mem_gib = int(f.readline().split()[1]) / 2**20
  return {'cpu': model, 'cores': os.cpu_count(), 'memory_gib': round(mem_gib, 1),
          'python': platform.python_version(), 'date': datetime.datetime.now().isoformat(timespec='seconds'),
          'load_average_start': os.getloadavg()}


def _loads(loads) -> str:
  return '-' if loads is None else '/'.join(f'{x:.1f}' for x in loads)


def our_versions() -> dict:
  return {name: importlib.metadata.version(name) for name in ('jax', 'jaxlib', 'flax')}


def _fmt(value, digits=3) -> str:
  return '-' if value is None else f'{value:.{digits}f}'


def _ratio(ours, theirs):
  return None if ours is None or theirs is None or theirs == 0 else ours / theirs


TITLES = {
    'xception_infer': 'Xception-65 V3+ OS16 infer b1', 'xception_train': 'Xception-65 V3+ OS16 train b2',
    'resnet101_infer': 'ResNet-101 V3 OS8 infer b1', 'resnet101_train': 'ResNet-101 V3 OS8 train b2',
}

REMAT_PAIRS = (  # the remat row's (ours with remat=True, its peer, title) pairs: ROWS['remat'] two by two
    (*ROWS['remat'][:2], 'Xception-65 train b2 remat'), (*ROWS['remat'][2:], 'ResNet-101 OS8 train b2 remat'))


def table_rows(rows: list, results: dict) -> list:
  """[(row, metric, ours, theirs, ours/theirs, note)] strings for the selected rows."""
  out = []

  def line(row, metric, ours, theirs, note='', digits=3):
    out.append((row, metric, _fmt(ours, digits), _fmt(theirs, digits), _fmt(_ratio(ours, theirs), 2), note))

  def get(name, key):
    result = results.get(name)
    return None if result is None or 'error' in result else result.get(key)

  def compile_note(name):
    return '' if get(name, 'compile_s') is None else f'ours compile {get(name, "compile_s"):.1f} s'

  for row in rows:
    first, second = ROWS[row][:2]
    if row in ('xception_infer', 'resnet101_infer', 'xception_train', 'resnet101_train'):
      sizes = 'ours 513, smp 512' if row.startswith('xception') else 'both 513'
      metric = 'run s' if row.endswith('infer') else 'step s'
      line(TITLES[row], metric, get(first, 'median_s'), get(second, 'median_s'),
           f'{sizes}; {compile_note(first)}')
      line('', 'peak RSS MiB', get(first, 'peak_rss_mib'), get(second, 'peak_rss_mib'), 'whole process',
           digits=0)
      if row.endswith('train'):
        line('', 'steps RSS MiB', get(first, 'peak_rss_runs_mib'), get(second, 'peak_rss_runs_mib'),
             'peak during the steps alone (VmHWM reset before them)', digits=0)
    elif row == 'mobilenetv2':
      line('MobileNetV2 V3 OS16 infer b1', 'run s', get(first, 'median_s'), None,
           f'513; {compile_note(first)}')
      line('MobileNetV2 V3 OS16 train b2', 'step s', get(second, 'median_s'), None,
           f'513; {compile_note(second)}')
      line('', 'peak RSS MiB', get(second, 'peak_rss_mib'), None, 'train step process', digits=0)
    elif row == 'remat':
      for ours, theirs, title in REMAT_PAIRS:
        line(title, 'step s', get(ours, 'median_s'), get(theirs, 'median_s'),
             f'ours with config.model.remat=True; {compile_note(ours)}')
        line('', 'peak RSS MiB', get(ours, 'peak_rss_mib'), get(theirs, 'peak_rss_mib'), 'whole process',
             digits=0)
    elif row == 'pipeline':  # ROWS['pipeline'] = (input pipeline, MobileNetV2 train step)
      step_s = get(second, 'median_s')
      consumed = None if step_s is None else MEASUREMENTS[second]['batch'] / step_s
      setup = '' if get(first, 'cores') is None else \
          f'{get(first, "cores")} cores, {get(first, "num_workers")} workers; '
      line('Input pipeline VOC crop 513', 'images/s', get(first, 'images_per_s'), consumed,
           f'{setup}theirs column = images/s the MobileNetV2 train step b2 consumes', digits=2)
      per_core = get(first, 'images_per_s_per_core')
      needed = '' if consumed is None or not per_core else \
          f'pipeline cores the step needs: {consumed / per_core:.3f}'
      line('', 'images/s/core', per_core, None, needed, digits=2)
  return out


def print_table(meta: dict, rows: list, results: dict) -> list:
  m, v = meta['machine'], meta['versions']
  print(f'\nMachine: {m["cpu"]}, {m["cores"]} cores, {m["memory_gib"]} GiB; children pinned to '
        f'{meta["threads"]} core(s) {meta["cpus"]}; {m["date"]}; load average (1/5/15 min) at start '
        f'{_loads(m["load_average_start"])}, at end {_loads(m.get("load_average_end"))}')
  names = ('jax', 'jaxlib', 'flax', 'torch', 'torchvision', 'timm', 'smp')
  print('Versions: ' + ', '.join(f'{k} {v[k]}' for k in names if k in v) + f'; python {m["python"]}')
  if 'torch_source' in v:
    print(f'torch from: {v["torch_source"]}; torchvision ops: {v.get("torchvision_ops")}')
  if 'host_malloc' in meta:
    ours, theirs = (meta['host_malloc'][side].removeprefix('host malloc: ') for side in ('ours', 'theirs'))
    print(f'Host malloc: ours train/pipeline {ours} (as `python -m deeplab_jax.main` runs); '
          f'ours infer and theirs {theirs}')
  kernels = sorted({str(r['cpu_kernels']) for r in results.values() if 'cpu_kernels' in r})
  if kernels:
    print(f'Native CPU kernels in ours train steps (deeplab_jax/models/cpu_kernels.py): {", ".join(kernels)}')
  rounds = meta.get('rounds', 1)
  per_round = '' if rounds == 1 else f', then the median over {rounds} interleaved rounds'
  print(f'Medians of {meta["repeats"]} runs after {meta["warmup"]} warm-up (ours after compilation)'
        f'{per_round}; random weights, 21 classes; threads: torch.set_num_threads, XLA default pool on the '
        'pinned cores.\n')
  table = table_rows(rows, results)
  header = ('row', 'metric', 'ours', 'theirs', 'ours/theirs', 'note')
  widths = [max(len(str(r[i])) for r in [header, *table]) for i in range(5)]
  for r in [header, *table]:
    print('  '.join([f'{r[0]:<{widths[0]}}', f'{r[1]:<{widths[1]}}',
                     *(f'{r[i]:>{widths[i]}}' for i in (2, 3, 4)), r[5]]).rstrip())
  if rounds > 1:
    print(f'\nours/theirs in each of the {rounds} interleaved rounds:')
    for title, ratios in round_ratios(rows, results):
      print(f'  {title}: ' + ' '.join(f'{r:.2f}' for r in ratios))
  failed = [name for name, result in results.items() if 'error' in result]
  if failed:
    print(f'\nFailed measurements (shown as -): {", ".join(failed)}')
  return table


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--only', default=','.join(ROWS), help=f'Comma-separated rows: {", ".join(ROWS)}.')
  parser.add_argument('--repeats', type=int, default=3, help='Timed runs per measurement (median).')
  parser.add_argument('--warmup', type=int, default=1, help='Untimed runs first (ours: after compilation).')
  parser.add_argument('--rounds', type=int, default=1,
                      help='Times every measurement runs, interleaved; the table shows medians over rounds.')
  parser.add_argument('--threads', type=int, default=2, help='Cores each child is pinned to (torch threads).')
  parser.add_argument('--pipeline_batches', type=int, default=20,
                      help='Timed input-pipeline batches (config batch size 16) after a warm-up batch.')
  parser.add_argument('--json', default='', help='Write the raw figures, machine and versions to this file.')
  parser.add_argument('--peers_venv', default=str(CACHE / 'peers_venv'),
                      help='Venv with torch/torchvision/timm/smp (created on first use).')
  parser.add_argument('--voc_dir', default=str(VOC_SUBSET), help='The VOC images for the pipeline row.')
  parser.add_argument('--data_dir', default=str(CACHE / 'peers_voc'),
                      help='Where the VOC subset is prepared for the pipeline row (once).')
  parser.add_argument('--child', default='', help=argparse.SUPPRESS)  # internal: one measurement (JSON spec)
  args = parser.parse_args()
  if args.child:
    print('RESULT ' + json.dumps(run_child(json.loads(args.child), args)), flush=True)
    return 0

  rows = [row.strip() for row in args.only.split(',') if row.strip()]
  unknown = sorted(set(rows) - set(ROWS))
  if unknown:
    parser.error(f'--only: unknown rows {unknown}; allowed: {", ".join(ROWS)}.')
  if args.repeats < 1 or args.rounds < 1 or args.warmup < 0 or args.pipeline_batches < 1:
    parser.error('--repeats, --rounds and --pipeline_batches must be >= 1, --warmup >= 0.')
  available = sorted(os.sched_getaffinity(0))
  if not 1 <= args.threads <= len(available):
    parser.error(f'--threads={args.threads}: this process may run on {len(available)} cores ({available}).')
  cpus = available[:args.threads]
  voc = pathlib.Path(args.voc_dir)
  if 'pipeline' in rows and not all((voc / p).exists() for p in VOC_LAYOUT):
    parser.error(f'--voc_dir={voc} must hold {", ".join(VOC_LAYOUT)} (as ../shared/data/voc2012_train_subset '
                 'beside the checkout does); pass the folder, or leave out the pipeline row.')
  names = list(dict.fromkeys(name for row in rows for name in ROWS[row]))
  versions = our_versions()
  peers_python = None
  if any(MEASUREMENTS[name]['side'] == 'torch' for name in names):
    peers_python, peer = ensure_peers_venv(pathlib.Path(args.peers_venv).expanduser())
    versions.update(peer)
  meta = {'machine': machine(), 'versions': versions, 'threads': args.threads, 'cpus': cpus,
          'repeats': args.repeats, 'warmup': args.warmup, 'rounds': args.rounds,
          'command': shlex.join(sys.argv),
          'host_malloc': {'ours': hugepages.describe(_ours_env('train')),  # ours infer: as theirs
                          'theirs': hugepages.describe(_torch_env(args.threads))}}
  rounds = []
  for index in range(args.rounds):
    if args.rounds > 1:
      print(f'Round {index + 1} of {args.rounds}', flush=True)
    rounds.append({name: measure(name, args, cpus, peers_python) for name in names})
  results = {name: combine_rounds([r[name] for r in rounds]) for name in names}
  meta['machine']['load_average_end'] = os.getloadavg()
  table = print_table(meta, rows, results)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(
        {'meta': meta, 'measurements': {n: {**MEASUREMENTS[n], **r} for n, r in results.items()},
         'rounds': rounds, 'table': table}, indent=1))
    print(f'\nRaw figures written to {args.json}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
