"""Checkpoints: the only module that imports orbax.

A training checkpoint is an orbax `CheckpointManager` step directory `<workdir>/checkpoints/<step>/` with three
items, so that any JAX program can restore the weights with orbax alone:
  * `variables`:   `{'params': ..., 'batch_stats': ...}`, plain nested dicts of arrays (the Flax variables);
  * `train_state`: `{'step': int32 scalar, 'opt_state': optax state}`, what resuming also needs;
  * `config`:      the full ml_collections config as JSON.
Evaluations attach `{'miou': ...}` metrics. The latest `keep` checkpoints and the best-mIoU one are kept.
Orbax writes each step into a temporary directory and renames it when complete, so a run killed while saving
leaves the previous checkpoints intact (the temporary directory is removed on the next start).
"""
import json
import os
from typing import Any, Optional

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

PyTree = Any

CHECKPOINT_SUBDIR = 'checkpoints'
VARIABLES_ITEM = 'variables'
TRAIN_STATE_ITEM = 'train_state'
CONFIG_ITEM = 'config'
BEST_METRIC = 'miou'
# Config fields that do not change the parameters: a resumed run may change them freely.
_MODEL_FIELDS_FREE_TO_CHANGE = ('dtype', 'remat', 'depthwise_impl', 'output_stride', 'atrous_rates',
                                'dropout_rate', 'fine_tune_batch_norm', 'bn_decay')
# Top-level parameter scopes that belong to the segmentation head, not the backbone (see `load_pretrained`).
HEAD_SCOPES = ('aspp', 'decoder', 'logits', 'largefov', 'aspp_l', 'image_pooling', 'concat_projection')


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable or does not fit the model being built."""


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON-compatible dicts (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


class Checkpointer:
  """Saves and restores training checkpoints under `<workdir>/checkpoints`.

  Every process must call `save` and `restore` (orbax coordinates the writes); arrays may be sharded.
  """

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    if keep < 1:
      raise ValueError(f'config.train.keep_checkpoints must be >= 1, got {keep}.')
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_SUBDIR))
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=lambda m: m[BEST_METRIC], best_mode='max', create=True,
        cleanup_tmp_directories=True, enable_async_checkpointing=async_save)
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, item_names=(VARIABLES_ITEM, TRAIN_STATE_ITEM, CONFIG_ITEM), options=options)
    except Exception as e:  # orbax raises several types for unreadable step directories.
      raise CheckpointError(
          f'Cannot read the checkpoint directory {self.directory}: {type(e).__name__}: {e}. '
          'Move it away or use another --workdir.') from e

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def best_step(self) -> Optional[int]:
    return self._manager.best_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, variables: PyTree, train_state: PyTree, config: ml_collections.ConfigDict,
           metrics: Optional[dict] = None) -> bool:
    """Writes step `step` (a no-op if it exists). `metrics` with a 'miou' entry ranks the best checkpoint."""
    if step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(**{
        # Host numpy copies (replicated): they restore without a target on any device topology.
        VARIABLES_ITEM: ocp.args.StandardSave(jax.device_get(variables)),
        TRAIN_STATE_ITEM: ocp.args.StandardSave(train_state),
        CONFIG_ITEM: ocp.args.JsonSave(config_to_dict(config)),
    })
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    return self._manager.save(step, args=args, metrics=metrics, force=True)

  def saved_config(self, step: int) -> dict:
    """The config JSON stored with step `step`."""
    return self._restore(step, {CONFIG_ITEM: ocp.args.JsonRestore()})[CONFIG_ITEM]

  def read_variables(self, step: int) -> tuple[PyTree, dict]:
    """`({'params', 'batch_stats'} as numpy arrays, config dict)` of step `step`, with no target needed."""
    restored = self._restore(step, {VARIABLES_ITEM: ocp.args.StandardRestore(),
                                    CONFIG_ITEM: ocp.args.JsonRestore()})
    return restored[VARIABLES_ITEM], restored[CONFIG_ITEM]

  def restore(self, step: int, variables: PyTree, train_state: Optional[PyTree] = None,
              config: Optional[ml_collections.ConfigDict] = None) -> tuple[PyTree, Optional[PyTree]]:
    """Restores step `step` into the structure, shapes and shardings of the given trees.

    Args:
      step: the step to restore.
      variables: target `{'params', 'batch_stats'}` (arrays or `jax.ShapeDtypeStruct`s with shardings).
      train_state: target `{'step', 'opt_state'}`, or None to restore the variables only.
      config: when given, its model must match the one the checkpoint was trained with.

    Returns:
      `(variables, train_state)`; `train_state` is None when not asked for.

    Raises:
      CheckpointError: naming the checkpoint and the problem (corrupt files, a different model).
    """
    if config is not None:
      check_compatible(self.saved_config(step), config, os.path.join(self.directory, str(step)))
    items = {VARIABLES_ITEM: ocp.args.StandardRestore(variables)}
    if train_state is not None:
      items[TRAIN_STATE_ITEM] = ocp.args.StandardRestore(train_state)
    restored = self._restore(step, items)
    return restored[VARIABLES_ITEM], restored.get(TRAIN_STATE_ITEM)

  def _restore(self, step: int, items: dict) -> dict:
    path = os.path.join(self.directory, str(step))
    try:
      return dict(self._manager.restore(step, args=ocp.args.Composite(**items)).items())
    except Exception as e:  # orbax/tensorstore raise many types for damaged files.
      raise CheckpointError(
          f'Checkpoint {path} is corrupt or incomplete and cannot be restored '
          f'({type(e).__name__}: {_first_line(e)}). Delete that step directory to resume from an earlier '
          'checkpoint, or use another --workdir.') from e

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _first_line(error: Exception, limit: int = 300) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else '')[:limit]


def check_compatible(saved: dict, config: ml_collections.ConfigDict, where: str) -> None:
  """Raises CheckpointError if `config.model` / the class count differ from the checkpoint's in a way that
  changes parameter shapes (dtype, remat, output stride and the like may differ)."""
  current = config_to_dict(config)
  saved_model, current_model = saved.get('model', {}), current.get('model', {})
  differences = [
      f'config.model.{key}: checkpoint {saved_model.get(key)!r}, now {current_model.get(key)!r}'
      for key in sorted(set(saved_model) | set(current_model))
      if key not in _MODEL_FIELDS_FREE_TO_CHANGE and saved_model.get(key) != current_model.get(key)]
  if differences:
    raise CheckpointError(
        f'The checkpoint {where} was written for a different model: ' + '; '.join(differences) +
        '. Use another --workdir, or the same model config.')


def _resolve_variables_dir(path: str) -> str:
  """Finds the `{'params', 'batch_stats'}` item inside `path` (a run, checkpoints, step or item dir)."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f'config.init_from={path!r}: no such directory.')
  for candidate in (path, os.path.join(path, CHECKPOINT_SUBDIR)):
    steps = [int(name) for name in os.listdir(candidate)
             if name.isdigit() and os.path.isdir(os.path.join(candidate, name))] if os.path.isdir(candidate) else []
    if steps:
      path = os.path.join(candidate, str(max(steps)))
      break
  if os.path.isdir(os.path.join(path, VARIABLES_ITEM)):
    path = os.path.join(path, VARIABLES_ITEM)
  if not os.path.exists(os.path.join(path, '_METADATA')) and not os.path.exists(
      os.path.join(path, '_CHECKPOINT_METADATA')):
    raise CheckpointError(
        f'config.init_from={path!r} holds no orbax checkpoint: expected a run/checkpoint directory, a step '
        f'directory with a `{VARIABLES_ITEM}` item, or an orbax PyTree of {{"params", "batch_stats"}}.')
  return path


def _flatten(tree: PyTree) -> dict[str, Any]:
  return {'/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _in_scope(name: str, scope: str) -> bool:
  if scope == 'all':
    return True
  # name is 'params/<top>/...' or 'batch_stats/<top>/...'
  parts = name.split('/')
  return len(parts) > 1 and parts[1] not in HEAD_SCOPES


def load_pretrained(path: str, target_variables: PyTree, scope: str = 'all') -> tuple[PyTree, dict]:
  """Initialises `target_variables` from a checkpoint for fine-tuning.

  Args:
    path: a run workdir, its `checkpoints` dir, one step dir, or an orbax PyTree dir of
      `{'params', 'batch_stats'}` (e.g. weights converted from the official TF checkpoints).
    target_variables: the freshly initialised `{'params', 'batch_stats'}` of the model to train.
    scope: 'all' loads every matching variable; 'backbone' leaves the head (ASPP, decoder, logits) as
      initialised.

  Returns:
    `(variables, report)`: variables with the same structure, dtypes and shardings as the target; report
    `{'loaded': [...], 'skipped': [(name, reason)], 'new': [...]}` with '/'-joined names.
  """
  if scope not in ('all', 'backbone'):
    raise ValueError(f"config.init_from_scope must be 'all' or 'backbone', got {scope!r}.")
  item_dir = _resolve_variables_dir(path)
  try:
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(item_dir).item_metadata.tree
    # numpy restore works whatever devices the checkpoint was written from.
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    source = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except Exception as e:  # damaged files raise many types.
    raise CheckpointError(f'Cannot read the pretrained checkpoint {item_dir} ({type(e).__name__}: '
                          f'{_first_line(e)}).') from e
  source_flat = _flatten(source)
  report = {'loaded': [], 'skipped': [], 'new': []}
  target_names = set()

  def load(key_path, target_leaf):
    name = '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in key_path)
    target_names.add(name)
    if name not in source_flat:
      report['new'].append(name)
      return target_leaf
    if not _in_scope(name, scope):
      report['skipped'].append((name, f'outside scope {scope!r}'))
      return target_leaf
    value = np.asarray(source_flat[name])
    if value.shape != tuple(target_leaf.shape):
      report['skipped'].append((name, f'shape {value.shape} in checkpoint, {tuple(target_leaf.shape)} in model'))
      return target_leaf
    report['loaded'].append(name)
    value = value.astype(target_leaf.dtype)
    sharding = getattr(target_leaf, 'sharding', None)
    return jax.device_put(value, sharding) if sharding is not None else value

  variables = jax.tree_util.tree_map_with_path(load, target_variables)
  report['skipped'].extend((name, 'not in the model') for name in sorted(set(source_flat) - target_names))
  logging.info('init_from %s (scope %s): %d loaded, %d skipped, %d new.', item_dir, scope,
               len(report['loaded']), len(report['skipped']), len(report['new']))
  return variables, report
