"""Forward pass of every full-size config at 513x513 on this machine's CPU, plus the depthwise A/B.

  python benchmarks/cpu_forward.py [--configs=voc_xception,voc_mobilenetv2] [--repeats=3]

For each config: builds the model, compiles a batch-1 inference at 513x513 (random weights), runs it
`repeats` times and prints compile time and the median run time. Then times Xception-65 V3+ (OS16) with
the depthwise convs as `feature_group_count` grouped convs forced, next to the default ('shifted' on CPU).
"""
import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deeplab_jax.models import create_model  # noqa: E402

ALL = ('voc_xception', 'voc_xception71', 'voc_resnet101_v3', 'voc_resnet101_v3plus', 'voc_mobilenetv2',
       'voc_vgg16_v1', 'voc_resnet101_v2', 'cityscapes_xception', 'ade20k_xception')


def time_forward(model_config, size=513, repeats=3):
  model = create_model(model_config)
  images = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
  forward = jax.jit(model.apply)
  start = time.perf_counter()
  compiled = forward.lower(variables, images).compile()
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    logits = jax.block_until_ready(compiled(variables, images))
    times.append(time.perf_counter() - start)
  assert logits.shape == (1, size, size, model_config.num_classes)
  assert bool(jnp.all(jnp.isfinite(logits)))
  return compile_s, statistics.median(times)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--configs', default=','.join(ALL))
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  print(f'jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}')
  print(f'{"config":24s} {"compile s":>10s} {"median run s":>13s}')
  for name in args.configs.split(','):
    config = importlib.import_module(f'configs.{name}').get_config()
    compile_s, run_s = time_forward(config.model, repeats=args.repeats)
    print(f'{name:24s} {compile_s:10.1f} {run_s:13.3f}', flush=True)
  print('\nXception-65 V3+ OS16 batch 1 at 513x513, depthwise implementation A/B:')
  for impl in ('shifted', 'grouped'):
    config = importlib.import_module('configs.voc_xception').get_config()
    config.model.depthwise_impl = impl
    compile_s, run_s = time_forward(config.model, repeats=args.repeats)
    print(f'  depthwise_impl={impl:8s} compile {compile_s:6.1f} s  median run {run_s:7.3f} s', flush=True)


if __name__ == '__main__':
  main()
