"""Training throughput on one GPU: Xception-65 V3+ OS16, ours next to smp, f32 and bf16 (issue 12).

  python benchmarks/gpu_train.py [--batch=16] [--size=513] [--steps=10] [--warmup=3]
      [--only=ours_f32,ours_bf16,smp_f32,smp_bf16] [--torch_python=PYTHON] [--json=PATH]

Each measurement runs in its own subprocess, one after the other (each framework alone on the GPU):

  ours_f32 / ours_bf16  configs/voc_xception.py at crop `--size` (513), `config.model.dtype` float32 or
                        bfloat16 (parameters and optimizer state stay float32), the library's own jitted,
                        donated train step (`train.make_train_step`: forward in train mode, cross-entropy
                        ignoring 255, L2, SGD momentum 0.9, poly schedule) on a one-device mesh.
  smp_f32 / smp_bf16    segmentation_models_pytorch.DeepLabV3Plus(encoder 'tu-xception65',
                        encoder_output_stride=16) at `--size` rounded down to a multiple of 16 (512; smp
                        rejects 513), train-mode forward, cross-entropy (ignore_index=255), backward and
                        torch.optim.SGD (momentum 0.9, weight decay 4e-5); bf16 = `torch.autocast('cuda',
                        torch.bfloat16)` around forward and loss (PyTorch's mixed precision: float32
                        weights); `torch.backends.cudnn.benchmark = True`; eager (no torch.compile).

Random weights and images, 21 classes, 5% of the labels 255. Times: `--warmup` steps (ours after
compilation, reported apart), then the median of `--steps` steps, each synchronised (jax.block_until_ready
/ torch.cuda.synchronize). Peak GPU memory: JAX's `peak_bytes_in_use`, PyTorch's `max_memory_allocated`.

FLOP convention (the same for both sides, "model FLOPs"): a train step costs 3x the forward pass
(forward, then input and weight gradients), the forward pass 2x its multiply-adds. Ours are counted by
`deeplab_jax.flops` (the published convention, 54.04B multiply-adds at 513); smp's forward by
`torch.utils.flop_counter.FlopCounterMode` (convolutions and matmuls). The fraction of peak divides the
achieved model FLOP/s by the GPU's dense peak for the dtype's matrix unit: `--peak_tflops_f32` (TF32, which
both frameworks use for float32 convolutions by default: XLA:GPU's default precision and cuDNN's
`allow_tf32`) and `--peak_tflops_bf16`; the defaults are the H200 SXM datasheet's 494.7 and 989.4.

The parent prints a table and writes everything to `--json`. The PyTorch children run under
`--torch_python` (default: this interpreter), which needs torch, timm and segmentation-models-pytorch.
"""
import argparse
import datetime
import json
import pathlib
import platform
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
# The peer first: it needs no compilation, so its rows exist even if ours runs out of time.
MEASUREMENTS = ('smp_f32', 'smp_bf16', 'ours_f32', 'ours_bf16')
WEIGHT_DECAY = 4e-5  # configs/voc_xception.py's L2, as SGD weight decay on the PyTorch side


def _summary(warmup_s, times_s, batch):
  median = statistics.median(times_s)
  return {'warmup_s': warmup_s, 'times_s': times_s, 'median_s': median, 'images_per_s': batch / median}


def child_ours(dtype: str, batch: int, size: int, warmup: int, steps: int, prng_impl: str = '') -> dict:
  sys.path.insert(0, str(REPO))
  import jax  # pylint: disable=g-import-not-at-top
  if prng_impl:
    jax.config.update('jax_default_prng_impl', prng_impl)
  import jaxlib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import voc_xception  # pylint: disable=g-import-not-at-top
  from deeplab_jax import flops  # pylint: disable=g-import-not-at-top
  from deeplab_jax.models import create_model  # pylint: disable=g-import-not-at-top
  import peers  # pylint: disable=g-import-not-at-top  (benchmarks/, sys.path[0])

  config = voc_xception.get_config()
  config.model.dtype = {'f32': 'float32', 'bf16': 'bfloat16'}[dtype]
  forward_macs, _ = flops.count_multiply_adds(config.model, size)
  step_fn, state, batch_arrays = peers.ours_train_setup(config, create_model(config.model), batch, size)
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch_arrays).compile()
  compile_s = time.perf_counter() - start

  def step():
    nonlocal state
    begin = time.perf_counter()
    state, metrics = compiled(state, batch_arrays)
    jax.block_until_ready((state, metrics))
    loss = float(metrics['total_loss'])
    if not np.isfinite(loss):
      raise FloatingPointError(f'ours {dtype}: train loss {loss}')
    return time.perf_counter() - begin

  warmup_s = [step() for _ in range(warmup)]
  times_s = [step() for _ in range(steps)]
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  return {**_summary(warmup_s, times_s, batch), 'compile_s': compile_s, 'size': size, 'batch': batch,
          'forward_flops_per_image': 2 * forward_macs, 'peak_memory_gib': stats.get('peak_bytes_in_use', 0) / 2**30,
          'device': device.device_kind, 'versions': {'jax': jax.__version__, 'jaxlib': jaxlib.__version__},
          'prng_impl': str(jax.config.jax_default_prng_impl)}


def child_smp(dtype: str, batch: int, size: int, warmup: int, steps: int) -> dict:
  import peers_torch  # pylint: disable=g-import-not-at-top  (benchmarks/, sys.path[0])
  torchvision_ops = peers_torch._prepare_torchvision()  # pylint: disable=protected-access  (CPU torch)
  import segmentation_models_pytorch as smp  # pylint: disable=g-import-not-at-top
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from torch.utils import flop_counter  # pylint: disable=g-import-not-at-top

  size = size // 16 * 16
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  torch.backends.cudnn.benchmark = True
  torch.manual_seed(0)
  model = peers_torch.build_model('smp_xception65', num_classes=21).to(device)  # the CPU table's peer
  with flop_counter.FlopCounterMode(display=False) as counter, torch.no_grad():
    model.eval()
    model(torch.zeros(1, 3, size, size, device=device))
  forward_flops = counter.get_total_flops()
  model.train()
  images = torch.rand(batch, 3, size, size, device=device)
  labels = torch.randint(0, 21, (batch, size, size), device=device)
  labels[torch.rand(labels.shape, device=device) < 0.05] = 255
  optimizer = torch.optim.SGD(model.parameters(), lr=0.007, momentum=0.9, weight_decay=WEIGHT_DECAY)
  autocast_dtype = {'f32': None, 'bf16': torch.bfloat16}[dtype]

  def step():
    begin = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
      loss = torch.nn.functional.cross_entropy(model(images), labels, ignore_index=255)
    loss.backward()
    optimizer.step()
    value = loss.item()  # synchronises
    if device.type == 'cuda':
      torch.cuda.synchronize()
    if value != value:
      raise FloatingPointError(f'smp {dtype}: train loss {value}')
    return time.perf_counter() - begin

  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  warmup_s = [step() for _ in range(warmup)]
  times_s = [step() for _ in range(steps)]
  peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == 'cuda' else 0.0
  return {**_summary(warmup_s, times_s, batch), 'compile_s': None, 'size': size, 'batch': batch,
          'forward_flops_per_image': forward_flops, 'peak_memory_gib': peak,
          'device': torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu',
          'versions': {'torch': torch.__version__, 'timm': timm.__version__, 'smp': smp.__version__,
                       'cudnn': torch.backends.cudnn.version(),
                       'torchvision_ops': torchvision_ops}}


def run_child(name: str, args) -> dict:
  """Runs one measurement in a subprocess; its `RESULT` line, or the error with the output's tail."""
  python = args.torch_python if name.startswith('smp') else sys.executable
  command = [python, str(pathlib.Path(__file__).resolve()), f'--child={name}', f'--batch={args.batch}',
             f'--size={args.size}', f'--steps={args.steps}', f'--warmup={args.warmup}',
             f'--prng_impl={args.prng_impl}']
  start = time.perf_counter()
  try:
    completed = subprocess.run(command, capture_output=True, text=True, timeout=args.child_timeout,
                               check=False)
  except subprocess.TimeoutExpired as e:
    return {'error': f'timed out after {args.child_timeout} s', 'tail': str(e.stderr or '')[-2000:]}
  wall_s = time.perf_counter() - start
  for line in completed.stdout.splitlines():
    if line.startswith('RESULT '):
      return {**json.loads(line[len('RESULT '):]), 'process_wall_s': wall_s}
  return {'error': f'exit code {completed.returncode}', 'tail': (completed.stdout + completed.stderr)[-3000:]}


def report(results: dict, args) -> str:
  peaks = {'f32': args.peak_tflops_f32, 'bf16': args.peak_tflops_bf16}
  lines = ['| run | crop | batch | step (median) | images/s | model TFLOP/s | of peak | peak GPU memory | compile |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for name, result in results.items():
    if 'error' in result:
      lines.append(f'| {name} | failed: {result["error"]} | | | | | | | |')
      continue
    tflops = 3 * result['forward_flops_per_image'] * result['images_per_s'] / 1e12
    fraction = tflops / peaks[name.split('_')[1]]
    compile_s = f'{result["compile_s"]:.0f} s' if result['compile_s'] is not None else '-'
    lines.append(f'| {name} | {result["size"]} | {result["batch"]} | {result["median_s"] * 1e3:.1f} ms | '
                 f'{result["images_per_s"]:.1f} | {tflops:.1f} | {100 * fraction:.1f}% | '
                 f'{result["peak_memory_gib"]:.1f} GiB | {compile_s} |')
  for dtype in ('f32', 'bf16'):
    ours, theirs = results.get(f'ours_{dtype}', {}), results.get(f'smp_{dtype}', {})
    if 'images_per_s' in ours and 'images_per_s' in theirs:
      lines.append(f'{dtype}: ours / smp images/s = {ours["images_per_s"] / theirs["images_per_s"]:.2f}')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--size', type=int, default=513)
  parser.add_argument('--steps', type=int, default=10, help='Timed steps (median reported).')
  parser.add_argument('--warmup', type=int, default=3, help='Untimed steps after compilation.')
  parser.add_argument('--only', default=','.join(MEASUREMENTS), help=f'Comma list of {MEASUREMENTS}.')
  parser.add_argument('--torch_python', default=sys.executable, help='Python with torch, timm and smp.')
  parser.add_argument('--child_timeout', type=int, default=600, help='Seconds per measurement.')
  parser.add_argument('--peak_tflops_f32', type=float, default=494.7, help='Dense TF32 peak of the GPU.')
  parser.add_argument('--peak_tflops_bf16', type=float, default=989.4, help='Dense bf16 peak of the GPU.')
  parser.add_argument('--json', default='', help='Write the results here.')
  parser.add_argument('--prng_impl', default='', help="Ours: JAX's default key implementation ('' keeps "
                      "JAX's threefry2x32; 'rbg' compiles each random draw of the initialisation far faster).")
  parser.add_argument('--child', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.child:
    side, dtype = args.child.split('_')
    child = {'ours': child_ours, 'smp': child_smp}[side]
    extra = {'prng_impl': args.prng_impl} if side == 'ours' else {}
    result = child(dtype, args.batch, args.size, args.warmup, args.steps, **extra)
    print('RESULT ' + json.dumps(result), flush=True)
    return

  names = [n for n in args.only.split(',') if n]
  unknown = sorted(set(names) - set(MEASUREMENTS))
  if unknown:
    parser.error(f'--only: unknown {unknown}; allowed: {", ".join(MEASUREMENTS)}.')
  results = {}
  started = datetime.datetime.now(datetime.timezone.utc)
  for name in names:
    results[name] = run_child(name, args)
    print(f'{name}: {json.dumps(results[name])[:400]}', flush=True)
    if args.json:  # written after each measurement, so a run cut short keeps what it measured
      pathlib.Path(args.json).write_text(json.dumps(
          {'date': started.isoformat(timespec='seconds'), 'machine': platform.node(), 'args': vars(args),
           'results': results}, indent=1))
  print(f'\n{started:%Y-%m-%d %H:%M} UTC, {platform.node()}, batch {args.batch}, crop {args.size}, '
        f'median of {args.steps} steps after {args.warmup}')
  print(report(results, args))


if __name__ == '__main__':
  main()
