"""The PyTorch side of `benchmarks/peers.py`: one timed measurement of a PyTorch DeepLab, in its own process.

Run by the peer venv's python (torch, torchvision, timm, segmentation-models-pytorch; no JAX), never
imported by the library or by `peers.py`:

  <peers_venv>/bin/python benchmarks/peers_torch.py --versions
  <peers_venv>/bin/python benchmarks/peers_torch.py --model=smp_xception65 --mode=train --size=512 --batch=2

Models (random weights, 21 classes):
  smp_xception65   segmentation_models_pytorch.DeepLabV3Plus, encoder `tu-xception65` (timm's aligned
                   Xception-65), encoder_output_stride 16 (V3+, OS16).
  tv_resnet101     torchvision.models.segmentation.deeplabv3_resnet101, no aux head (V3, OS8: the last two
                   ResNet stages dilated, ASPP rates 12/24/36).
Modes: `infer` = eval mode under torch.inference_mode(); `train` = train-mode forward, cross-entropy
(ignore_index 255), backward and an SGD step (momentum 0.9, the recipe's L2 as `weight_decay`).

Prints one line `RESULT <json>` at the end: the per-run times in seconds (warm-up runs and timed runs
apart) and the process's peak resident memory (VmHWM).
"""
import argparse
import functools
import importlib.util
import json
import os
import sys

import torch

import timing  # benchmarks/timing.py (standard library only)

# Schemas of the torchvision operators its Python code registers fake implementations for at import
# (torchvision/_meta_registrations.py: `register_fake('torchvision::nms')` and `'torchvision::qnms'`; the
# other registrations there are skipped when the C++ extension is absent).
TORCHVISION_SCHEMAS = (
    'nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor',
    'qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor',
)
_torchvision_library = None  # kept alive: a torch.library.Library drops its definitions when collected


@functools.cache  # once per process: a second Library('torchvision', 'DEF') would be refused
def _prepare_torchvision() -> str:
  """Makes `import torchvision` work beside a CPU-only torch.

  PyPI's torchvision wheel is built against CUDA torch: its `_C` extension does not load beside the CPU
  build, and without it torchvision's import fails registering fake kernels for operators nobody defined
  ('operator torchvision::nms does not exist'). If the extension loads, nothing is needed; otherwise the
  operator schemas are defined here (no kernels: the segmentation models never call them).

  Returns:
    How torchvision's operators are provided, for the report.
  """
  global _torchvision_library
  spec = importlib.util.find_spec('torchvision')
  if spec is None:
    raise ImportError('torchvision is not installed in this venv.')
  package_dir = list(spec.submodule_search_locations)[0]
  for name in sorted(os.listdir(package_dir)):
    if name.startswith('_C.') and name.endswith(('.so', '.pyd')):
      try:
        torch.ops.load_library(os.path.join(package_dir, name))
        return 'torchvision C++ extension'
      except (OSError, RuntimeError) as e:
        reason = str(e).splitlines()[0].replace(package_dir + os.sep, '')[:160]
        break
  else:
    reason = 'no _C extension file'
  _torchvision_library = torch.library.Library('torchvision', 'DEF')
  for schema in TORCHVISION_SCHEMAS:
    _torchvision_library.define(schema)
  return f'schemas only (extension not loaded: {reason})'


def versions() -> dict:
  """Versions of the peer packages (importing each, as a measurement does)."""
  ops = _prepare_torchvision()
  import segmentation_models_pytorch  # pylint: disable=g-import-not-at-top
  import timm  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  return {'torch': torch.__version__, 'torchvision': torchvision.__version__, 'timm': timm.__version__,
          'smp': segmentation_models_pytorch.__version__, 'torchvision_ops': ops,
          'torch_threads_default': torch.get_num_threads()}


def build_model(name: str, num_classes: int) -> torch.nn.Module:
  """The peer model `name` with random weights."""
  _prepare_torchvision()
  if name == 'smp_xception65':
    import segmentation_models_pytorch as smp  # pylint: disable=g-import-not-at-top
    return smp.DeepLabV3Plus(encoder_name='tu-xception65', encoder_weights=None, encoder_output_stride=16,
                             classes=num_classes)
  if name == 'tv_resnet101':
    from torchvision.models import segmentation  # pylint: disable=g-import-not-at-top
    return segmentation.deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=num_classes,
                                            aux_loss=False)
  raise ValueError(f'Unknown --model {name!r}; allowed: smp_xception65, tv_resnet101.')


def _logits(output) -> torch.Tensor:
  return output['out'] if isinstance(output, dict) else output  # torchvision returns {'out': logits}


def measure(args) -> dict:
  """Times `args.warmup` then `args.repeats` runs of one inference or train step.

  Returns:
    {'warmup_s': [...], 'times_s': [...], 'median_s', 'peak_rss_mib' (whole process), 'peak_rss_runs_mib'
    (during the runs only), 'peak_rss_before_runs_mib', 'threads', 'params'}.
  """
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  model = build_model(args.model, args.num_classes)
  images = torch.randn(args.batch, 3, args.size, args.size)
  if args.mode == 'infer':
    model.eval()

    def run():
      with torch.inference_mode():
        logits = _logits(model(images))
      assert logits.shape == (args.batch, args.num_classes, args.size, args.size), logits.shape
  elif args.mode == 'train':
    model.train()
    labels = torch.randint(0, args.num_classes, (args.batch, args.size, args.size))
    labels[torch.rand(labels.shape) < 0.05] = 255  # some ignored pixels, as VOC's borders
    optimizer = torch.optim.SGD(model.parameters(), lr=0.007, momentum=0.9, weight_decay=args.weight_decay)

    def run():
      optimizer.zero_grad(set_to_none=True)
      loss = torch.nn.functional.cross_entropy(_logits(model(images)), labels, ignore_index=255)
      loss.backward()
      optimizer.step()
      if not torch.isfinite(loss):
        raise FloatingPointError(f'{args.model} train loss is {loss.item()}.')
  else:
    raise ValueError(f'Unknown --mode {args.mode!r}; allowed: infer, train.')

  return {**timing.time_runs(run, args.warmup, args.repeats), 'threads': torch.get_num_threads(),
          'params': sum(p.numel() for p in model.parameters())}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--versions', action='store_true', help='Print the package versions and exit.')
  parser.add_argument('--model', choices=('smp_xception65', 'tv_resnet101'))
  parser.add_argument('--mode', choices=('infer', 'train'), default='infer')
  parser.add_argument('--size', type=int, default=513, help='Square input side.')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--num_classes', type=int, default=21)
  parser.add_argument('--weight_decay', type=float, default=0.0, help='SGD weight decay (train mode).')
  parser.add_argument('--threads', type=int, default=2, help='torch.set_num_threads.')
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  if args.versions:
    result = versions()
  elif args.model is None:
    parser.error('--model is required (or --versions).')
  else:
    result = measure(args)
  print('RESULT ' + json.dumps(result), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
