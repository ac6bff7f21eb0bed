"""Checkpoints: the only module that imports orbax.

A training checkpoint is an orbax `CheckpointManager` step directory `<workdir>/checkpoints/<step>/` with
three items, so that any JAX program can restore the weights with orbax alone:
  * `variables`:   `{'params': ..., 'batch_stats': ...}`, plain nested dicts of arrays (the Flax variables);
  * `train_state`: `{'step': int32 scalar, 'opt_state': optax state}`, what resuming also needs;
  * `config`:      the full ml_collections config as JSON.
Beside the items, `<step>/step_record.json` (written by this module) holds the SHA-256 and size of every file
of the step and the step's metrics (`{'miou': ...}` from evaluations). The latest `keep` checkpoints and the
best-mIoU one are kept.

What survives which accident:
  * A crash or a failing write (disk full) while saving: orbax writes each step into a temporary directory
    and renames it when complete; older steps are pruned only after a newer one is complete and recorded, so
    the last complete checkpoint stays. A failed write raises `CheckpointWriteError` naming the path and the
    cause at the next `save`/`wait`/`check_for_errors`/`close`.
  * Bit rot, truncated or overwritten files: `restore` verifies every file against the step record first.
    `restore_latest_intact` walks the steps newest first, skips damaged ones with a warning naming each and
    why, and never deletes anything (training may move skipped steps aside into `checkpoints_set_aside/`).
  * Divergence: `save` refuses non-finite state; `mark_diverged` records which steps hold the weights that
    produced a non-finite loss (`checkpoints/suspect_steps.json`), and restores skip them from then on.
"""
import dataclasses
import hashlib
import json
import os
import re
import threading
import time
from typing import Any, Callable, Iterable, Optional, Union

from absl import logging
from flax import traverse_util
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

CHECKPOINT_SUBDIR = 'checkpoints'
SET_ASIDE_SUBDIR = 'checkpoints_set_aside'
VARIABLES_ITEM = 'variables'
TRAIN_STATE_ITEM = 'train_state'
CONFIG_ITEM = 'config'
BEST_METRIC = 'miou'
STEP_RECORD = 'step_record.json'
SUSPECT_FILE = 'suspect_steps.json'
_RECORD_FORMAT = 1
_TMP_MARKER = '.orbax-checkpoint-tmp'
# Config fields that do not change the parameters: a resumed run may change them freely.
_MODEL_FIELDS_FREE_TO_CHANGE = ('dtype', 'remat', 'depthwise_impl', 'output_stride', 'atrous_rates',
                                'dropout_rate', 'fine_tune_batch_norm', 'bn_decay', 'head_bn_decay')


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable or does not fit the model being built."""


class CheckpointWriteError(CheckpointError):
  """Writing a checkpoint failed (disk full, permissions, I/O error); earlier checkpoints are intact."""


class NonFiniteStateError(CheckpointError):
  """`save` was given NaN or Inf in the variables or optimizer state; nothing was written."""


class PretrainedLoadError(CheckpointError):
  """`load_pretrained` loaded too small a share of the model. `report` lists every variable and why."""

  def __init__(self, message: str, report: dict):
    super().__init__(message)
    self.report = report


@dataclasses.dataclass
class RestoreResult:
  """What `Checkpointer.restore_latest_intact` restored.

  Attributes:
    step: the step restored.
    variables: `{'params', 'batch_stats'}` in the target's structure, shapes and shardings.
    train_state: `{'step', 'opt_state'}`, or None when not asked for.
    skipped: `(step, reason)` for every newer step that was passed over (damaged or suspect), newest first.
    set_aside: `{step: new path}` of skipped steps moved out of the checkpoint directory.
  """
  step: int
  variables: PyTree
  train_state: Optional[PyTree]
  skipped: list
  set_aside: dict


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON-compatible dicts (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def error_text(error: BaseException, limit: int = 300) -> str:
  """`Type: first meaningful line` of an exception, without object reprs or tensorstore spec dumps."""
  text = str(error)
  text = text.split(' [tensorstore_spec', 1)[0].split('tensorstore_spec=', 1)[0]
  text = re.sub(r'<bound method [^<>]*(<[^<>]*>[^<>]*)*>', '', text)
  text = re.sub(r'<[^<>]* at 0x[0-9a-fA-F]+>', '', text)
  text = re.sub(r"\s*\[os_error_code='?(\d+)'?\]", '', text)
  lines = [' '.join(line.split()) for line in text.splitlines()]
  lines = [line for line in lines if line.strip(' :;,.()[]')]
  first = lines[0] if lines else ''
  if len(first) > limit:
    first = first[:limit - 3] + '...'
  name = type(error).__name__
  return f'{name}: {first}' if first else name


def _atomic_write_json(path: str, content: Any) -> None:
  """Writes JSON to `path` via a temporary file and a rename, fsynced: readers see old or new, never half."""
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    with open(tmp, 'w') as f:
      json.dump(content, f, indent=1, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)  # our own half-written temporary file (e.g. the disk filled up)
    raise


# Step-level files orbax writes or rewrites when it commits the step (after the record is written): the
# step metadata (timestamps; restoring with explicit items does not read it) and commit markers.
_UNRECORDED = ('_CHECKPOINT_METADATA', 'commit_success.txt')


def _digest_files(step_dir: str) -> dict:
  """`{relative path: {'sha256', 'size'}}` of every file under `step_dir` but the step record and
  `_UNRECORDED`."""
  files = {}
  for root, _, names in os.walk(step_dir):
    for name in names:
      path = os.path.join(root, name)
      relpath = os.path.relpath(path, step_dir).replace(os.sep, '/')
      if relpath in _UNRECORDED or relpath == STEP_RECORD or relpath.startswith(f'{STEP_RECORD}.tmp'):
        continue
      sha = hashlib.sha256()
      size = 0
      with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 22), b''):
          sha.update(block)
          size += len(block)
      files[relpath] = {'sha256': sha.hexdigest(), 'size': size}
  return files


def _sync_processes(name: str) -> None:
  """A barrier over all processes (a no-op with one): files process 0 wrote are visible after it."""
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(f'deeplab_jax_checkpoint_{name}')


def _path_name(key_path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in key_path)


def nonfinite_leaves(tree: PyTree) -> list[str]:
  """'/'-joined paths of the floating-point leaves of `tree` that hold a NaN or an Inf.

  Works on numpy and (replicated) jax arrays; each process checks the data it holds.
  """
  bad = []
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, 'dtype', None)
    if dtype is None or not jax.numpy.issubdtype(dtype, jax.numpy.inexact):
      continue
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      value = np.asarray(leaf.addressable_data(0))
    else:
      value = np.asarray(leaf)
    if not np.isfinite(value).all():
      bad.append(_path_name(key_path))
  return bad


class Checkpointer:
  """Saves and restores training checkpoints under `<workdir>/checkpoints`, verified and never half-written.

  Every process must call `save` and `restore` (orbax coordinates the writes); arrays may be sharded. Files
  this module writes itself (step records, the suspect-step record, moves) are written by process 0.
  """

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, read_only: bool = False):
    """Opens (creating unless `read_only`) `<workdir>/checkpoints`.

    Args:
      workdir: the run directory.
      keep: how many of the latest checkpoints to keep (the best-mIoU one is kept as well).
      async_save: write in a background thread (the train loop only waits for the host copy).
      read_only: for evaluation and inspection: nothing is written, moved or cleaned up (a training run
        writing the same workdir keeps its temporary directories).
    """
    if keep < 1:
      raise ValueError(f'config.train.keep_checkpoints must be >= 1, got {keep}.')
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, CHECKPOINT_SUBDIR)
    self.keep = keep
    self.read_only = read_only
    self._async = async_save and not read_only
    self._pending: Optional[dict] = None  # the save in flight: {'step', 'metrics', 'recorded'}
    self._lock = threading.Lock()
    self._is_primary = jax.process_index() == 0
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(f'No checkpoint directory {self.directory}.')
    # Retention is done here (`_prune`), only after a newer step is complete, so orbax keeps every step; its
    # best-metric tracking is not used either (one damaged metrics file would stop it from opening at all).
    options = ocp.CheckpointManagerOptions(
        create=not read_only, cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=self._async,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._record_in_background)
        if self._async and jax.process_count() == 1 else None)
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, item_names=(VARIABLES_ITEM, TRAIN_STATE_ITEM, CONFIG_ITEM), options=options)
    except Exception as e:  # orbax raises several types for unreadable directories.
      raise CheckpointError(f'Cannot open the checkpoint directory {self.directory}: {error_text(e)}. '
                            'Move it away or use another --workdir.') from e

  # ---------------------------------------------------------------------------------------------- steps

  def all_steps(self) -> list[int]:
    """Every complete step in the directory, ascending (suspect and damaged ones included)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The newest step not marked suspect by `mark_diverged` (not verified: see `restore_latest_intact`)."""
    suspect = self.suspect_steps()
    steps = [s for s in self.all_steps() if s not in suspect]
    return steps[-1] if steps else None

  def best_step(self) -> Optional[int]:
    """The step with the highest recorded mIoU among those not marked suspect, or None."""
    suspect = self.suspect_steps()
    scored = [(value, step) for step in self.all_steps() if step not in suspect
              for value in [self.metrics(step).get(BEST_METRIC)] if value is not None]
    return max(scored)[1] if scored else None

  def metrics(self, step: int) -> dict:
    """The metrics saved with `step` (`{}` if none or unreadable)."""
    record = self._read_record(step)
    if record is not None and record.get('metrics'):
      return dict(record['metrics'])
    try:  # steps written before step records existed kept orbax's metrics item
      with open(os.path.join(self._step_dir(step), 'metrics', 'metrics')) as f:
        return dict(json.load(f))
    except (OSError, ValueError, TypeError):
      return {}

  def step_path(self, step: int) -> str:
    """The directory of `step`."""
    return self._step_dir(step)

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # ----------------------------------------------------------------------------------------------- save

  def save(self, step: int, variables: PyTree, train_state: PyTree, config: ml_collections.ConfigDict,
           metrics: Optional[dict] = None) -> bool:
    """Writes step `step` (a no-op returning False if it exists). `metrics['miou']` ranks the best one.

    With `async_save` the write continues in the background; a failure surfaces as CheckpointWriteError from
    the next `save`, `wait`, `check_for_errors` or `close`.

    Raises:
      NonFiniteStateError: a NaN/Inf in `variables` or `train_state` (nothing is written).
      CheckpointWriteError: this or the previous write failed; the path and the cause are named.
    """
    if self.read_only:
      raise CheckpointError(f'{self.directory} was opened read-only; cannot save step {step}.')
    self._finish_pending()
    # Host numpy copies (replicated): they restore without a target on any device topology.
    host_variables = jax.device_get(variables)
    bad = nonfinite_leaves({'variables': host_variables, 'train_state': train_state})
    if bad:
      raise NonFiniteStateError(
          f'Refusing to save step {step} to {self.directory}: {len(bad)} arrays hold NaN or Inf, e.g. '
          f'{", ".join(bad[:5])}. The training diverged; the last finite checkpoint is step '
          f'{self.latest_step()}.')
    if step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(**{
        VARIABLES_ITEM: ocp.args.StandardSave(host_variables),
        TRAIN_STATE_ITEM: ocp.args.StandardSave(train_state),
        CONFIG_ITEM: ocp.args.JsonSave(config_to_dict(config)),
    })
    metrics = {} if metrics is None else {k: float(v) for k, v in metrics.items()}
    with self._lock:
      self._pending = {'step': step, 'metrics': metrics, 'recorded': False}
    try:
      self._manager.save(step, args=args, force=True)
    except Exception as e:  # a synchronous write error, or one orbax raises before going to the background
      self._pending = None
      raise self._write_error(step, e) from e
    if not self._async:
      self._finish_pending()
    return True

  def _record_in_background(self) -> None:
    """orbax's post-finalization callback: writes the step record before the step directory is renamed.

    In this orbax version the callback runs when every item is complete but before the temporary step
    directory gets its final name, so the record lands atomically with the step. Should a version call it
    after the rename, the record is written into the final directory instead (a moment later).
    """
    with self._lock:
      pending = self._pending
    if pending is None or not self._is_primary:
      return
    step = pending['step']
    final = self._step_dir(step)
    if os.path.isdir(final):
      step_dir = final
    else:
      candidates = [name for name in os.listdir(self.directory) if name.startswith(f'{step}{_TMP_MARKER}')
                    and os.path.isdir(os.path.join(self.directory, name))]
      if len(candidates) != 1:
        return  # not found: `_finish_pending` records the final directory
      step_dir = os.path.join(self.directory, candidates[0])
    self._write_record(step_dir, step, pending['metrics'])
    pending['recorded'] = True

  def _write_record(self, step_dir: str, step: int, metrics: dict) -> None:
    record = {'format': _RECORD_FORMAT, 'step': step, 'metrics': metrics, 'written': time.time(),
              'files': _digest_files(step_dir)}
    _atomic_write_json(os.path.join(step_dir, STEP_RECORD), record)

  def _finish_pending(self) -> None:
    """Waits for the save in flight; raises CheckpointWriteError if it failed, then prunes old steps."""
    pending = self._pending
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # the background write failed
      self._pending = None
      step = pending['step'] if pending else None
      raise self._write_error(step, e) from e
    if pending is None:
      return
    self._pending = None
    step = pending['step']
    if not os.path.isdir(self._step_dir(step)):
      raise self._write_error(step, None)
    if self._is_primary:
      try:
        if not pending['recorded'] and not os.path.exists(os.path.join(self._step_dir(step), STEP_RECORD)):
          self._write_record(self._step_dir(step), step, pending['metrics'])
        self._clear_suspect([step])
      except OSError as e:
        raise self._write_error(step, e) from e
    _sync_processes(f'recorded_{step}')  # every process prunes from the same records
    self._prune()

  def _write_error(self, step: Optional[int], error: Optional[BaseException]) -> CheckpointWriteError:
    where = self._step_dir(step) if step is not None else self.directory
    if error is None:
      cause = 'the step directory is missing after the save (see the orbax errors logged above)'
    else:
      cause = error_text(error, limit=400)
      if 'No space left on device' in str(error) or getattr(error, 'errno', None) == 28:
        cause = f'No space left on device ({cause})'
    intact = [s for s in self.all_steps() if s != step]
    return CheckpointWriteError(
        f'Writing checkpoint {where} failed: {cause}. The earlier checkpoints {intact or "(none)"} in '
        f'{self.directory} are intact; fix the cause (e.g. free disk space) and rerun the same command to '
        'resume from the latest of them.')

  def check_for_errors(self) -> None:
    """Raises CheckpointWriteError now if the background save already failed (cheap; call it often)."""
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self._finish_pending()

  def _prune(self) -> None:
    """Deletes all but the latest `keep` steps and the best one; runs only after a step is complete.

    Every process runs it (orbax's delete is collective; only process 0 removes files).
    """
    steps = self.all_steps()
    keep = set(steps[-self.keep:])
    best = self.best_step()
    if best is not None:
      keep.add(best)
    keep |= set(self.suspect_steps())  # evidence of a divergence stays until the run moves it aside
    for step in steps:
      if step not in keep:
        try:
          self._manager.delete(step)
        except Exception as e:  # pruning is housekeeping: never fail a run over it
          logging.warning('Could not remove the old checkpoint %s: %s', self._step_dir(step), error_text(e))

  def wait(self) -> None:
    """Blocks until the save in flight is complete and recorded; raises CheckpointWriteError if it failed."""
    self._finish_pending()

  def close(self) -> None:
    """Finishes the save in flight (raising CheckpointWriteError if it failed) and releases orbax."""
    try:
      self._finish_pending()
    finally:
      self._manager.close()

  # -------------------------------------------------------------------------------------------- verify

  def _read_record(self, step: int) -> Optional[dict]:
    try:
      with open(os.path.join(self._step_dir(step), STEP_RECORD)) as f:
        record = json.load(f)
      return record if isinstance(record, dict) else None
    except (OSError, ValueError):
      return None

  def verify(self, step: int) -> Optional[str]:
    """Checks every file of `step` against its step record.

    Returns:
      None when intact, or when the step has no record (written by an older version: restoring still
      decodes it, but bit flips cannot be detected); otherwise the reason, naming the first bad file.
    """
    status, reason = self._integrity(step)
    return reason if status == 'damaged' else None

  def _integrity(self, step: int) -> tuple[str, Optional[str]]:
    """('intact' | 'unrecorded' | 'damaged', reason if damaged)."""
    step_dir = self._step_dir(step)
    record_path = os.path.join(step_dir, STEP_RECORD)
    if not os.path.isdir(step_dir):
      return 'damaged', f'{step_dir} does not exist'
    if not os.path.exists(record_path):
      logging.warning('Checkpoint %s has no %s (written before integrity records, or the run stopped right '
                      'after writing it): it is restored without verification.', step_dir, STEP_RECORD)
      return 'unrecorded', None
    record = self._read_record(step)
    if record is None or not isinstance(record.get('files'), dict):
      return 'damaged', f'its integrity record {record_path} is unreadable or damaged'
    bad = []
    for relpath, expected in sorted(record['files'].items()):
      path = os.path.join(step_dir, relpath)
      try:
        size = os.path.getsize(path)
      except OSError:
        bad.append(f'{path} is missing')
        continue
      if size != expected.get('size'):
        bad.append(f'{path} has {size} bytes, {expected.get("size")} were written (truncated or overwritten)')
        continue
      sha = hashlib.sha256()
      with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 22), b''):
          sha.update(block)
      if sha.hexdigest() != expected.get('sha256'):
        bad.append(f'{path} differs from what was written (SHA-256 mismatch: bit rot or overwritten)')
    if bad:
      more = f' (and {len(bad) - 1} more damaged files)' if len(bad) > 1 else ''
      return 'damaged', bad[0] + more
    return 'intact', None

  # ------------------------------------------------------------------------------------------- restore

  def saved_config(self, step: int) -> dict:
    """The config JSON stored with step `step`."""
    return self._restore(step, {CONFIG_ITEM: ocp.args.JsonRestore()})[CONFIG_ITEM]

  def read_variables(self, step: int) -> tuple[PyTree, dict]:
    """`({'params', 'batch_stats'} as numpy arrays, config dict)` of step `step`, verified (no target)."""
    self._raise_if_damaged(step)
    restored = self._restore(step, {VARIABLES_ITEM: ocp.args.StandardRestore(),
                                    CONFIG_ITEM: ocp.args.JsonRestore()})
    return restored[VARIABLES_ITEM], restored[CONFIG_ITEM]

  def restore(self, step: int, variables: PyTree, train_state: Optional[PyTree] = None,
              config: Optional[ml_collections.ConfigDict] = None) -> tuple[PyTree, Optional[PyTree]]:
    """Verifies step `step` and restores it into the structure, shapes and shardings of the given trees.

    Args:
      step: the step to restore.
      variables: target `{'params', 'batch_stats'}` (arrays or `jax.ShapeDtypeStruct`s with shardings).
      train_state: target `{'step', 'opt_state'}`, or None to restore the variables only.
      config: when given, its model must match the one the checkpoint was trained with.

    Returns:
      `(variables, train_state)`; `train_state` is None when not asked for.

    Raises:
      CheckpointError: naming the checkpoint and the problem (damaged files, a different model).
    """
    self._raise_if_damaged(step)
    if config is not None:
      check_compatible(self.saved_config(step), config, self._step_dir(step))
    return self._restore_items(step, variables, train_state)

  def _restore_items(self, step: int, variables: PyTree,
                     train_state: Optional[PyTree]) -> tuple[PyTree, Optional[PyTree]]:
    items = {VARIABLES_ITEM: ocp.args.StandardRestore(variables)}
    if train_state is not None:
      items[TRAIN_STATE_ITEM] = ocp.args.StandardRestore(train_state)
    restored = self._restore(step, items)
    return restored[VARIABLES_ITEM], restored.get(TRAIN_STATE_ITEM)

  def _raise_if_damaged(self, step: int) -> None:
    reason = self.verify(step)
    if reason is not None:
      raise CheckpointError(f'Checkpoint {self._step_dir(step)} is damaged: {reason}. Nothing was deleted; '
                            'resuming falls back to the newest intact step.')

  def _restore(self, step: int, items: dict) -> dict:
    path = self._step_dir(step)
    try:
      return dict(self._manager.restore(step, args=ocp.args.Composite(**items)).items())
    except Exception as e:  # orbax/tensorstore raise many types for damaged files.
      raise CheckpointError(f'Checkpoint {path} is damaged or incomplete and cannot be restored '
                            f'({error_text(e)}).') from e

  def restore_latest_intact(self, variables: PyTree, train_state: Optional[PyTree] = None,
                            config: Optional[ml_collections.ConfigDict] = None,
                            set_aside_skipped: bool = False) -> Optional[RestoreResult]:
    """Restores the newest step that is not suspect, verifies and decodes; newer ones are skipped.

    Each skipped step is logged with its reason. Nothing is deleted. With `set_aside_skipped` (training
    resuming), the skipped steps are moved to `<workdir>/checkpoints_set_aside/` so the resumed run can write
    those step numbers again and retention never counts them.

    Args:
      variables, train_state, config: as for `restore`.
      set_aside_skipped: move the skipped steps out of the checkpoint directory.

    Returns:
      A RestoreResult, or None when there is no step, or every step is suspect (start afresh).

    Raises:
      CheckpointError: the checkpoint's model differs from `config` (not a damage: nothing is skipped), or
        every non-suspect step is damaged (the message lists each step and why).
    """
    self._finish_pending()
    self._manager.reload()  # another process (a training run) may have written steps since we opened
    suspect = self.suspect_steps()
    skipped, damaged = [], []
    for step in reversed(self.all_steps()):
      if step in suspect:
        skipped.append((step, f'suspect: {suspect[step]}'))
        continue
      status, reason = self._integrity(step)
      if status != 'damaged':
        try:
          saved = self.saved_config(step)
        except CheckpointError as e:
          if status == 'intact':
            raise
          status, reason = 'damaged', str(e)
      if status != 'damaged':
        if config is not None:
          check_compatible(saved, config, self._step_dir(step))  # another model: no older step fixes that
        try:
          restored_variables, restored_state = self._restore_items(step, variables, train_state)
        except CheckpointError as e:
          if status == 'intact':
            # The files are exactly as written, so the targets differ (e.g. another optimizer): do not skip.
            raise
          reason = str(e)  # without a record, damage and mismatch look alike: look further back
      if reason is not None:
        skipped.append((step, f'damaged: {reason}'))
        damaged.append(step)
        logging.warning('Skipping checkpoint %s: %s', self._step_dir(step), reason)
        continue
      moved = self.set_aside([s for s, _ in skipped], dict(skipped)) if set_aside_skipped else {}
      for skipped_step, why in skipped:
        where = moved.get(skipped_step, self._step_dir(skipped_step) + ' (left in place)')
        logging.warning('Restored step %d instead of the newer step %d (%s): %s', step, skipped_step, why,
                        where)
      return RestoreResult(step=step, variables=restored_variables, train_state=restored_state,
                           skipped=skipped, set_aside=moved)
    if damaged:
      listing = '; '.join(f'step {s}: {why}' for s, why in skipped)
      raise CheckpointError(
          f'No intact checkpoint in {self.directory}: {listing}. Nothing was deleted. Move the directory '
          'away (or use another --workdir) to start afresh, or restore the files from a backup.')
    if skipped:
      moved = self.set_aside([s for s, _ in skipped], dict(skipped)) if set_aside_skipped else {}
      logging.warning('Every checkpoint in %s is suspect (%s): starting from the initial weights.%s',
                      self.directory, ', '.join(str(s) for s, _ in skipped),
                      f' They were moved to {sorted(moved.values())}.' if moved else '')
    return None

  def set_aside(self, steps: Iterable[int], reasons: Optional[dict] = None) -> dict:
    """Moves `steps` to `<workdir>/checkpoints_set_aside/<step>-<time>/` (never deletes); returns paths."""
    if self.read_only:
      raise CheckpointError(f'{self.directory} was opened read-only; cannot move steps aside.')
    steps = [s for s in steps if os.path.isdir(self._step_dir(s))]
    moved = {}
    if self._is_primary and steps:
      target_root = os.path.join(self.workdir, SET_ASIDE_SUBDIR)
      os.makedirs(target_root, exist_ok=True)
      stamp = time.strftime('%Y%m%d-%H%M%S')
      for step in steps:
        target = os.path.join(target_root, f'{step}-{stamp}')
        suffix = 1
        while os.path.exists(target):
          target = os.path.join(target_root, f'{step}-{stamp}-{suffix}')
          suffix += 1
        os.rename(self._step_dir(step), target)
        with open(os.path.join(target, 'WHY_SET_ASIDE.txt'), 'w') as f:
          f.write(f'Step {step} was moved here from {self.directory} on {stamp}: '
                  f'{(reasons or {}).get(step, "skipped on restore")}\n')
        moved[step] = target
        logging.warning('Moved checkpoint step %d aside to %s (nothing deleted).', step, target)
      self._clear_suspect(steps)
    _sync_processes('set_aside')
    self._manager.reload()
    return moved

  # ------------------------------------------------------------------------------------------ divergence

  def suspect_steps(self) -> dict[int, str]:
    """`{step: reason}` of the steps `mark_diverged` recorded and that are still in the directory."""
    path = os.path.join(self.directory, SUSPECT_FILE)
    try:
      with open(path) as f:
        record = json.load(f)
      return {int(step): str(reason) for step, reason in record.items()}
    except FileNotFoundError:
      return {}
    except (OSError, ValueError, TypeError, AttributeError) as e:
      logging.warning('Ignoring the unreadable suspect-step record %s (%s).', path, error_text(e))
      return {}

  def mark_diverged(self, first_bad_step: int, reason: str = '') -> list[int]:
    """Records that the loss of step `first_bad_step` was not finite.

    The loss of step s is computed from the weights saved as step s - 1, so every checkpoint from step
    `first_bad_step - 1` on holds weights that led to it: they are marked suspect (kept on disk, skipped by
    `latest_step`, `best_step` and `restore_latest_intact`). A step saved again later is trusted again.

    Returns:
      The steps marked, ascending.
    """
    if self.read_only:
      raise CheckpointError(f'{self.directory} was opened read-only; cannot record a divergence.')
    try:
      self._finish_pending()
    except CheckpointWriteError as e:
      logging.warning('%s', e)
    marked = [s for s in self.all_steps() if s >= first_bad_step - 1]
    if marked and self._is_primary:
      record = {str(s): r for s, r in self.suspect_steps().items()}
      why = reason or f'the loss was not finite at step {first_bad_step}'
      record.update({str(s): why for s in marked})
      _atomic_write_json(os.path.join(self.directory, SUSPECT_FILE), record)
      logging.warning('Marked checkpoints %s in %s as suspect: %s.', marked, self.directory, why)
    _sync_processes(f'diverged_{first_bad_step}')
    return marked

  def newest_trusted_step(self) -> Optional[int]:
    """The newest step that is not suspect and whose files verify (not decoded), or None."""
    self._manager.reload()
    suspect = self.suspect_steps()
    for step in reversed(self.all_steps()):
      if step not in suspect and self.verify(step) is None:
        return step
    return None

  def _clear_suspect(self, steps: Iterable[int]) -> None:
    suspect = self.suspect_steps()
    remaining = {str(s): r for s, r in suspect.items() if s not in set(steps)}
    if len(remaining) != len(suspect):
      _atomic_write_json(os.path.join(self.directory, SUSPECT_FILE), remaining)


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
  """Finds the `{'params', 'batch_stats'}` item inside `path` (a run, checkpoints, step or item dir).

  In a run's `checkpoints` directory the newest intact step not marked suspect is used (damaged newer steps
  are skipped with a warning, as when resuming); a step directory with a step record is verified.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f'config.init_from={path!r}: no such directory.')
  for candidate in (path, os.path.join(path, CHECKPOINT_SUBDIR)):
    steps = sorted(int(name) for name in os.listdir(candidate)
                   if name.isdigit() and os.path.isdir(os.path.join(candidate, name))) if os.path.isdir(
                       candidate) else []
    if not steps:
      continue
    step = steps[-1]
    if os.path.basename(candidate) == CHECKPOINT_SUBDIR:
      ckpt = Checkpointer(os.path.dirname(candidate), read_only=True)
      try:
        step = ckpt.newest_trusted_step()
      finally:
        ckpt.close()
      if step is None:
        raise CheckpointError(f'config.init_from={path!r}: none of the steps {steps} in {candidate} is '
                              'intact and trusted (see the warnings above).')
      if step != steps[-1]:
        logging.warning('config.init_from=%s: using step %d; the newer steps %s are damaged or suspect.',
                        path, step, [s for s in steps if s > step])
    path = os.path.join(candidate, str(step))
    break
  if os.path.isdir(os.path.join(path, VARIABLES_ITEM)):
    _verify_step_dir(path)
    path = os.path.join(path, VARIABLES_ITEM)
  if not os.path.exists(os.path.join(path, '_METADATA')) and not os.path.exists(
      os.path.join(path, '_CHECKPOINT_METADATA')):
    raise CheckpointError(
        f'config.init_from={path!r} holds no orbax checkpoint: expected a run/checkpoint directory, a step '
        f'directory with a `{VARIABLES_ITEM}` item, or an orbax PyTree of {{"params", "batch_stats"}}.')
  return path


def _verify_step_dir(step_dir: str) -> None:
  """Raises CheckpointError if a step directory does not match its step record (if it has one)."""
  parent, name = os.path.split(step_dir)
  if not (os.path.basename(parent) == CHECKPOINT_SUBDIR and name.isdigit()
          and os.path.exists(os.path.join(step_dir, STEP_RECORD))):
    return
  ckpt = Checkpointer(os.path.dirname(parent), read_only=True)
  try:
    reason = ckpt.verify(int(name))
  finally:
    ckpt.close()
  if reason is not None:
    raise CheckpointError(f'config.init_from={step_dir!r} is damaged: {reason}.')


def _names(tree: PyTree) -> dict[tuple, Any]:
  """`{key tuple: leaf}` of a nested dict of variables (keys may contain '/', as 'logits/semantic')."""
  return {key: leaf for key, leaf in traverse_util.flatten_dict(tree, keep_empty_nodes=True).items()
          if leaf is not traverse_util.empty_node}


def _in_scope(key: tuple, scope: str, backbone_scope: Optional[str]) -> bool:
  # key is ('params' | 'batch_stats', <top-level module>, ...)
  return scope == 'all' or (len(key) > 1 and key[1] == backbone_scope)


def load_pretrained(path: str, target_variables: PyTree, scope: str = 'all',
                    backbone_scope: Optional[str] = None, min_loaded_fraction: float = 0.9,
                    init_variables: Union[PyTree, Callable[[], PyTree], None] = None) -> tuple[PyTree, dict]:
  """Initialises `target_variables` from a checkpoint for fine-tuning or evaluation.

  Args:
    path: a run workdir, its `checkpoints` dir, one step dir, or an orbax PyTree dir of
      `{'params', 'batch_stats'}` (e.g. weights converted from the official TF checkpoints).
    target_variables: the model's `{'params', 'batch_stats'}`: initialised arrays, or `jax.ShapeDtypeStruct`s
      (with shardings) when nothing is initialised yet.
    scope: 'all' loads every matching variable; 'backbone' only those under `backbone_scope`, leaving the
      heads (ASPP, decoder, logits) as initialised.
    backbone_scope: the backbone's top-level scope, `deeplab_jax.models.backbone_scope(config.model)`
      ('xception_65', 'resnet_v1_101', 'MobilenetV2', 'vgg_16'); required for scope 'backbone'.
    min_loaded_fraction: the least share of the in-scope variables (counted as arrays) that must load
      (`config.init_from_min_fraction`); below it a PretrainedLoadError lists what did not load and why.
    init_variables: where variables that do not load come from when the target leaves are
      `ShapeDtypeStruct`s: a tree like the target, or a function returning one (called only if needed).

  Returns:
    `(variables, report)`: variables with the target's structure, dtypes and shardings; report
    `{'loaded': [...], 'skipped': [(name, reason)], 'new': [...], 'loaded_fraction': float, 'in_scope': int}`
    with '/'-joined names ('skipped' also lists checkpoint variables the model does not have).

  Raises:
    PretrainedLoadError: fewer than `min_loaded_fraction` of the in-scope variables loaded.
    CheckpointError: the checkpoint is unreadable or damaged, or ShapeDtypeStruct targets lack a value and
      no `init_variables` was given.
  """
  if scope not in ('all', 'backbone'):
    raise ValueError(f"config.init_from_scope must be 'all' or 'backbone', got {scope!r}.")
  if scope == 'backbone' and not backbone_scope:
    raise ValueError("load_pretrained(scope='backbone') needs backbone_scope, the backbone's top-level "
                     "variable scope: deeplab_jax.models.backbone_scope(config.model).")
  if not 0.0 <= min_loaded_fraction <= 1.0:
    raise ValueError(f'config.init_from_min_fraction must be in [0, 1], got {min_loaded_fraction}.')
  item_dir = _resolve_variables_dir(path)
  try:
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(item_dir).item_metadata.tree
    # numpy restore works whatever devices the checkpoint was written from.
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    source = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except Exception as e:  # damaged files raise many types.
    raise CheckpointError(f'Cannot read the pretrained checkpoint {item_dir} ({error_text(e)}).') from e
  source_flat = traverse_util.flatten_dict(source, sep='/')
  target_flat = _names(target_variables)
  report = {'loaded': [], 'skipped': [], 'new': []}
  values, fallback_names = {}, []
  for key, target_leaf in target_flat.items():
    name = '/'.join(key)
    in_scope = _in_scope(key, scope, backbone_scope)
    value = None
    if name not in source_flat:
      report['new'].append(name)
    elif not in_scope:
      report['skipped'].append((name, f'outside scope {scope!r} ({backbone_scope})'))
    else:
      value = np.asarray(source_flat[name])
      if value.shape != tuple(target_leaf.shape):
        report['skipped'].append(
            (name, f'shape {value.shape} in checkpoint, {tuple(target_leaf.shape)} in model'))
        value = None
    if value is None:
      fallback_names.append(key)
      values[key] = target_leaf
      continue
    report['loaded'].append(name)
    value = value.astype(target_leaf.dtype)
    sharding = getattr(target_leaf, 'sharding', None)
    values[key] = jax.device_put(value, sharding) if sharding is not None else value
  report['skipped'].extend((name, 'not in the model')
                           for name in sorted(set(source_flat) - {'/'.join(k) for k in target_flat}))
  in_scope_count = sum(_in_scope(k, scope, backbone_scope) for k in target_flat)
  report['in_scope'] = in_scope_count
  report['loaded_fraction'] = len(report['loaded']) / in_scope_count if in_scope_count else 1.0
  logging.info('init_from %s (scope %s): %d loaded (%.1f%% of %d in scope), %d skipped, %d new.', item_dir,
               scope, len(report['loaded']), 100 * report['loaded_fraction'], in_scope_count,
               len(report['skipped']), len(report['new']))
  if report['loaded_fraction'] < min_loaded_fraction:
    raise PretrainedLoadError(_too_few_message(path, item_dir, scope, report, min_loaded_fraction,
                                               backbone_scope), report)
  abstract = [k for k in fallback_names if isinstance(values[k], jax.ShapeDtypeStruct)]
  if abstract:
    if init_variables is None:
      raise CheckpointError(
          f'config.init_from={path!r} lacks {len(abstract)} variables of this model (e.g. '
          f'{", ".join("/".join(k) for k in abstract[:5])}) and no init_variables was given to fill them.')
    fallback = _names(init_variables() if callable(init_variables) else init_variables)
    for key in abstract:
      if key not in fallback or tuple(fallback[key].shape) != tuple(values[key].shape):
        raise CheckpointError(f'init_variables has no {"/".join(key)} of shape {tuple(values[key].shape)}.')
      values[key] = fallback[key]
  variables = traverse_util.unflatten_dict(values)
  for collection in target_variables:  # keep empty collections (a VGG model has no batch_stats)
    variables.setdefault(collection, {})
  return variables, report


def _too_few_message(path: str, item_dir: str, scope: str, report: dict, min_fraction: float,
                     backbone_scope: Optional[str], limit: int = 40) -> str:
  share = 100 * report['loaded_fraction']
  lines = [f'config.init_from={path!r} ({item_dir}) loaded only {len(report["loaded"])} of the '
           f'{report["in_scope"]} model variables in scope {scope!r} ({share:.1f}%, below '
           f'config.init_from_min_fraction={min_fraction}). Is it a checkpoint of this model? Not loaded:']
  def in_scope(name):
    return scope == 'all' or name.split('/')[1:2] == [backbone_scope]

  missed = [(n, r) for n, r in report['skipped'] if in_scope(n) and r != 'not in the model']
  missed += [(n, 'not in the checkpoint') for n in report['new'] if in_scope(n)]
  lines += [f'  {name}: {reason}' for name, reason in missed[:limit]]
  if len(missed) > limit:
    lines.append(f'  ... and {len(missed) - limit} more (PretrainedLoadError.report lists all)')
  extra = [n for n, r in report['skipped'] if r == 'not in the model']
  if extra:
    lines.append(f'The checkpoint also holds {len(extra)} variables this model lacks, e.g. '
                 f'{", ".join(extra[:3])}.')
  if scope == 'all' and backbone_scope and report['loaded'] and all(
      n.split('/')[1:2] == [backbone_scope] for n in report['loaded']):
    lines.append("Everything that loaded is backbone: for a backbone-only checkpoint set "
                 "config.init_from_scope='backbone'.")
  lines.append('Lower config.init_from_min_fraction to accept a partial load.')
  return '\n'.join(lines)
