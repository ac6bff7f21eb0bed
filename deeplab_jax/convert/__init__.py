"""Importers for published DeepLab weights: official TF checkpoints, TFLite models, PyTorch backbones.

`convert(source, config)` reads any of them into our `{'params', 'batch_stats'}` (checked name by name and
shape by shape against `config.model`) with a report of what was loaded, skipped or left new;
`convert_and_save(...)` also writes the orbax checkpoint that `config.init_from` and `--mode=eval` read.
Command line: `python -m deeplab_jax.convert --source=PATH --config=CONFIG --output=DIR`.
"""
import os
from typing import Tuple

import ml_collections

from deeplab_jax.convert import common
from deeplab_jax.convert import pytorch
from deeplab_jax.convert import tf_checkpoint
from deeplab_jax.convert import tflite
from deeplab_jax.convert.tf_names import ConversionError

FORMATS = ('auto', 'tf', 'tflite', 'pytorch')


def detect_format(source: str) -> str:
  """'tflite', 'pytorch' or 'tf' from the source path."""
  if source.endswith('.tflite'):
    return 'tflite'
  if source.endswith(('.safetensors', '.pth', '.pt', '.bin')):
    return 'pytorch'
  return 'tf'


def convert(source: str, config: ml_collections.ConfigDict, fmt: str = 'auto',
            scope: str = 'auto', match_tflite_runtime: bool = False) -> Tuple[dict, dict]:
  """Reads `source` into variables for `config.model`.

  Args:
    source: a TF checkpoint (prefix, `.index`, or its directory), a `.tflite` file, or a PyTorch state
      dict (`.safetensors`; `.pth` with torch installed).
    config: the full config; only `config.model` shapes the result.
    fmt: one of FORMATS ('auto' looks at the file name).
    scope: 'auto', 'all' or 'backbone' (see `common.assign`); PyTorch backbones are always 'backbone'.
    match_tflite_runtime: TFLite only: reproduce the official uint8 runtime's requantization-free resize
      of the image-pooling branch instead of the graph's meaning (see `tflite.tflite_to_tf_arrays`).

  Returns:
    `(variables, report)`.

  Raises:
    ConversionError: the source and the config disagree; the message lists every offending name.
  """
  if fmt not in FORMATS:
    raise ValueError(f'--format={fmt!r} is not one of {FORMATS}.')
  if not os.path.exists(source) and not os.path.exists(source + '.index'):
    raise ConversionError(f'--source={source!r} does not exist.')
  fmt = detect_format(source) if fmt == 'auto' else fmt
  if fmt == 'tflite':
    return tflite.convert_tflite(source, config, 'all' if scope == 'auto' else scope,
                                 match_tflite_runtime)
  if match_tflite_runtime:
    raise ValueError('match_tflite_runtime applies to .tflite sources only.')
  if fmt == 'pytorch':
    return pytorch.convert_pytorch(source, config, 'backbone' if scope == 'auto' else scope)
  return tf_checkpoint.convert_tf_checkpoint(source, config, scope)


def convert_and_save(source: str, config: ml_collections.ConfigDict, output: str, fmt: str = 'auto',
                     scope: str = 'auto', match_tflite_runtime: bool = False) -> dict:
  """`convert`, then writes `<output>/checkpoints/0` and `<output>/conversion_report.json`.

  Returns:
    The report, with 'source' and 'checkpoint' (the written step directory) added.
  """
  variables, report = convert(source, config, fmt, scope, match_tflite_runtime)
  report['source'] = os.path.abspath(source)
  report['checkpoint'] = common.save(output, variables, config, report)
  return report


__all__ = ['ConversionError', 'FORMATS', 'convert', 'convert_and_save', 'detect_format']
