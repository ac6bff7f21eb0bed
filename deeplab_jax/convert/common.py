"""Shared steps of every importer: the model's expected variables, the checked assignment, the report, saving.

Every importer turns its source into `{official TF variable name: array}` in the TF layout (HWIO kernels,
`[kh, kw, C, 1]` depthwise kernels, BatchNorm gamma/beta/moving_mean/moving_variance) and hands it to
`tf_names.assign_tf_arrays`, so that one place checks names and shapes for all formats. The converted
variables are written with `deeplab_jax.checkpoint` (the only module that talks to orbax) as step 0 of
`<output>/checkpoints/`, which `config.init_from=<output>` (fine-tuning) and `--mode=eval --workdir=<output>`
or `config.init_from=<output>` (evaluation, prediction) read.
"""
import json
import os
import re
from typing import List, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from deeplab_jax import models
from deeplab_jax.convert import tf_names
from deeplab_jax.models import heads

ConversionError = tf_names.ConversionError
REPORT_FILE = 'conversion_report.json'
SCOPES = ('auto', 'all', 'backbone')


def bn_epsilon(model_config: ml_collections.ConfigDict, tf_scope: str) -> float:
  """The BatchNorm epsilon our model uses for the layer with this TF scope (backbone vs heads differ)."""
  spec = models.backbone_spec(model_config)
  return spec.bn_epsilon if tf_scope.startswith(spec.scope + '/') else heads.HEAD_BN.epsilon


def target_variables(model_config: ml_collections.ConfigDict) -> dict:
  """`{'params', 'batch_stats'}` of `ShapeDtypeStruct`s for this model (no compilation, no weights)."""
  model = models.create_model(model_config)
  size = 4 * model.output_stride + 1
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)},
                                             images, train=False))
  return {'params': shapes['params'], 'batch_stats': shapes.get('batch_stats', {})}


def assign(tf_arrays: Mapping[str, np.ndarray], model_config: ml_collections.ConfigDict,
           scope: str = 'auto', skipped: Optional[List[Tuple[str, str]]] = None) -> Tuple[dict, dict]:
  """Builds our variables from `{TF name: array}`, checking every name and shape.

  Args:
    tf_arrays: official-layout arrays by TF variable name.
    model_config: `config.model` of the model the weights are for.
    scope: 'all' (every model variable must come from the source), 'backbone' (only the backbone must;
      the heads are left new, as for ImageNet checkpoints) or 'auto' ('all' if the source holds any head
      variable, else 'backbone').
    skipped: `(source name, reason)` pairs the importer already set aside (e.g. ImageNet classifiers).

  Returns:
    `(variables, report)`: variables `{'params', 'batch_stats'}` holding exactly the loaded arrays (only
    the backbone for scope 'backbone'); report with 'loaded', 'skipped' [(name, reason)], 'new' and 'scope'.

  Raises:
    ConversionError: listing unmapped source variables, shape disagreements and missing variables.
  """
  if scope not in SCOPES:
    raise ValueError(f'scope={scope!r} is not one of {SCOPES}.')
  prefix = models.backbone_scope(model_config) + '/'
  if scope == 'auto':
    has_head = any(not name.startswith(prefix) and not tf_names.IGNORED_TF_VARIABLES.search(name)
                   for name in tf_arrays)
    scope = 'all' if has_head else 'backbone'
  target = target_variables(model_config)
  prefix_filter = None if scope == 'all' else (lambda path: path.startswith(prefix))
  assigned, report = tf_names.assign_tf_arrays(tf_arrays, target, prefix_filter=prefix_filter)
  # Keep exactly the loaded arrays (scope 'backbone' leaves the heads out), on the model's own key tuples:
  # module names hold '/', so names are compared joined but never split.
  loaded = {tf_names.tf_to_ours(name)[:2] for name in report['loaded']}
  variables = {c: flax.traverse_util.unflatten_dict({
      key: np.asarray(value, np.float32)
      for key, value in flax.traverse_util.flatten_dict(assigned.get(c, {})).items()
      if (c, '/'.join(key)) in loaded}) for c in ('params', 'batch_stats')}
  ignored = sorted(n for n in tf_arrays if tf_names.IGNORED_TF_VARIABLES.search(n))
  report = {
      'scope': scope,
      'loaded': list(report['loaded']),
      'skipped': list(skipped or []) + [(n, 'outside the backbone') for n in report['skipped']]
                 + [(n, 'training state, not a weight') for n in ignored],
      'new': list(report['new']),
  }
  return variables, report


def format_report(report: dict, limit: int = 8) -> str:
  """A short human-readable summary: counts, then the first names of each list."""
  lines = [f"scope {report['scope']}: loaded {len(report['loaded'])}, skipped {len(report['skipped'])}, "
           f"left new {len(report['new'])}"]
  if report['skipped']:
    lines.append('  skipped: ' + ', '.join(f'{n} ({why})' for n, why in report['skipped'][:limit])
                 + (' ...' if len(report['skipped']) > limit else ''))
  if report['new']:
    lines.append('  left new (initialised, not from the source): ' + ', '.join(report['new'][:limit])
                 + (' ...' if len(report['new']) > limit else ''))
  for note in report.get('notes', []):
    lines.append('  note: ' + note)
  return '\n'.join(lines)


def save(output: str, variables: dict, config: ml_collections.ConfigDict, report: dict) -> str:
  """Writes the converted variables as step 0 of `<output>/checkpoints` plus `conversion_report.json`.

  Returns:
    The checkpoint step directory.
  """
  from deeplab_jax import checkpoint  # pylint: disable=g-import-not-at-top  (orbax only when saving)
  output = os.path.abspath(output)
  ckpt_dir = os.path.join(output, checkpoint.CHECKPOINT_SUBDIR)
  if os.path.isdir(ckpt_dir) and any(re.fullmatch(r'\d+', n) for n in os.listdir(ckpt_dir)):
    raise ConversionError(f'{ckpt_dir} already holds checkpoints; choose an empty --output directory.')
  ckpt = checkpoint.Checkpointer(output, keep=1, async_save=False)
  ckpt.save(0, variables, {'step': np.zeros((), np.int32)}, config)
  ckpt.close()
  with open(os.path.join(output, REPORT_FILE), 'w') as f:
    json.dump(report, f, indent=1)
  return os.path.join(ckpt_dir, '0')
