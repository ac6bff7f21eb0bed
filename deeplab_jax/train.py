"""Training: data-parallel `jax.jit` over a device mesh, the official DeepLab loss and optimizer.

The batch is sharded on the mesh's `data` axis and the state is replicated, so XLA inserts the gradient
all-reduce and BatchNorm statistics cover the global batch, exactly as one device with the whole batch.
Each step's dropout key is `fold_in(key(seed), step)` and the input pipeline restarts at the saved step, so a
resumed run continues the same sequence.
"""
import functools
import signal
import sys
import threading
import time
from typing import Any, Optional

from absl import logging
import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax
import tqdm

from deeplab_jax import checkpoint
from deeplab_jax import evaluate
from deeplab_jax import input_pipeline
from deeplab_jax import losses
from deeplab_jax import metrics
from deeplab_jax import models
from deeplab_jax import optim
from deeplab_jax import run_lock
from deeplab_jax import summary_writer
from deeplab_jax.models import create_model

Array = jax.Array
PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. `step` counts completed steps."""
  step: Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree

  def variables(self) -> dict:
    return {'params': self.params, 'batch_stats': self.batch_stats}


def create_mesh(devices=None) -> Mesh:
  """A 1-D mesh named `data` over all (global) devices."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ('data',))


def create_train_state(config: ml_collections.ConfigDict, model, tx: optax.GradientTransformation,
                       mesh: Mesh) -> TrainState:
  """Initialises the model and optimizer directly into replicated arrays on `mesh`."""
  params_key, dropout_key = jax.random.split(jax.random.key(config.train.seed))
  images = jnp.zeros((1, *config.train.crop_size, 3), jnp.float32)

  def init():
    variables = model.init({'params': params_key, 'dropout': dropout_key}, images, train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params))

  return jax.jit(init, out_shardings=NamedSharding(mesh, P()))()


def train_step(state: TrainState, batch: dict, *, model, tx: optax.GradientTransformation,
               schedule: optax.Schedule, train_config: ml_collections.ConfigDict,
               ignore_label: int) -> tuple[TrainState, dict]:
  """One SGD step on a (global) batch `{'image': [B, H, W, 3], 'label': [B, H, W]}`."""
  dropout_key = jax.random.fold_in(jax.random.key(train_config.seed), state.step)

  def loss_fn(params):
    logits, new_model_state = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
        mutable=['batch_stats'], rngs={'dropout': dropout_key})
    pixel_loss = losses.segmentation_loss(logits, batch['label'], ignore_label,
                                          train_config.top_k_percent_pixels)
    regularization = losses.l2_regularization(params, train_config.weight_decay)
    return pixel_loss + regularization, (pixel_loss, regularization, new_model_state, logits)

  grads, (pixel_loss, regularization, new_model_state, logits) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  labels = batch['label']
  labelled = (labels != ignore_label) & (labels < logits.shape[-1])
  correct = jnp.sum((jnp.argmax(logits, -1) == labels) & labelled)
  step_metrics = {'loss': pixel_loss, 'total_loss': pixel_loss + regularization,
                  'regularization': regularization, 'learning_rate': schedule(state.step),
                  'pixel_accuracy': correct / jnp.maximum(jnp.sum(labelled), 1)}
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=new_model_state.get('batch_stats', state.batch_stats),
                            opt_state=opt_state)
  return new_state, step_metrics


def make_train_step(config: ml_collections.ConfigDict, model, tx, schedule, mesh: Mesh):
  """`train_step` jitted over `mesh`: state replicated and donated, batch sharded on `data`."""
  step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, train_config=config.train,
                           ignore_label=config.dataset.ignore_label)
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  return jax.jit(step, in_shardings=(replicated, data), out_shardings=(replicated, replicated),
                 donate_argnums=(0,), compiler_options=cpu_compiler_options(mesh))


def cpu_compiler_options(mesh: Mesh) -> dict | None:
  """XLA options for a train step on a CPU mesh, which make its recomputations take effect (None elsewhere).

  `jax.checkpoint` keeps its recomputation apart from the forward pass with optimization barriers; XLA:CPU
  removes them early (its `cse_barrier_expander` pass, jaxlib 0.10) and CSE then merges the recomputation
  back into the forward pass, so what was to be recomputed is kept after all. With that pass off the
  barriers stay. Two things rely on it: `config.model.remat` (Xception-65 train step, batch 2, 513x513:
  4.88 GB of temporaries with remat and without the option, 4.85 GB without remat, 1.29 GB with both) and
  the BatchNorm outputs that CPU training recomputes (`layers.recompute_batch_norm`: 2.44 GB with the
  option, 4.86 GB without). Values are unchanged (tested). Accelerators keep their defaults.
  """
  if mesh.devices.flat[0].platform == 'cpu':
    return {'xla_disable_hlo_passes': 'cse_barrier_expander'}
  return None


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field for settings the trainer cannot run with."""
  t, devices, processes = config.train, jax.device_count(), jax.process_count()
  for field in ('batch_size', 'num_steps', 'log_every_steps', 'checkpoint_every_steps', 'eval_every_steps'):
    if t[field] <= 0:
      raise ValueError(f'config.train.{field} must be positive, got {t[field]}.')
  if t.batch_size % devices or t.batch_size % processes:
    raise ValueError(f'config.train.batch_size={t.batch_size} must be a multiple of the number of devices '
                     f'({devices}) and processes ({processes}).')
  if len(t.crop_size) != 2 or min(t.crop_size) < 1:
    raise ValueError(f'config.train.crop_size must be (height, width), got {t.crop_size}.')
  if config.model.num_classes != config.dataset.num_classes:
    raise ValueError(f'config.model.num_classes={config.model.num_classes} differs from '
                     f'config.dataset.num_classes={config.dataset.num_classes}.')


class TrainingInterrupted(Exception):
  """SIGINT/SIGTERM stopped the run after a checkpoint of the step reached was written."""

  def __init__(self, signum: int, step: int, checkpoint_dir: str):
    self.signum, self.step = signum, step
    name = signal.Signals(signum).name
    super().__init__(f'Stopped by {name} at step {step}; checkpoint {checkpoint_dir}/{step} written. Rerun the '
                     'same command to resume.')


class _StopSignals:
  """Turns SIGINT/SIGTERM into a flag the loop checks after each step (a second SIGINT interrupts at once).

  A signal arriving inside XLA or a garbage-collection callback would otherwise raise KeyboardInterrupt
  where it can be swallowed; the flag is read at one safe place, and every process agrees on it.
  """

  def __init__(self):
    self.received, self._previous = None, {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGINT, signal.SIGTERM):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.received == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
    self.received = signum
    logging.warning('%s received: stopping after this step and writing a checkpoint.',
                    signal.Signals(signum).name)

  def stop_requested(self, step: int, every: int) -> Optional[int]:
    """The signal any process received, or None.

    One process reads its flag after every step. Several processes must stop at the same step, so they
    agree through a collective, which they run only every `every` steps (a preemption notice leaves time).
    """
    if jax.process_count() == 1:
      return self.received
    if step % every:
      return None
    received = multihost_utils.process_allgather(np.asarray(self.received or 0, np.int32))
    return int(np.max(received)) or None

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


def _check_finite(history: list, ckpt: checkpoint.Checkpointer) -> dict:
  """Host copies of buffered step metrics; stops the run at the first non-finite loss.

  The weights saved at the step before a non-finite loss produced it, so those checkpoints are marked
  suspect (kept on disk, skipped on resume) and the message names the newest trusted one.
  """
  fetched = jax.device_get(history)
  for step, step_metrics in fetched:
    if not np.isfinite(step_metrics['total_loss']):
      _diverged(ckpt, step, f'The training loss became {step_metrics["total_loss"]} at step {step} (learning '
                f'rate {step_metrics["learning_rate"]:.3g})')
  return {key: float(np.mean([m[key] for _, m in fetched])) for key in fetched[-1][1]}


def _diverged(ckpt: checkpoint.Checkpointer, first_bad_step: int, what: str) -> None:
  marked = ckpt.mark_diverged(first_bad_step)
  trusted = ckpt.newest_trusted_step()
  resume = f'rerunning resumes from step {trusted}' if trusted is not None else \
      'rerunning starts from the initial weights'
  suspects = f'checkpoints {marked} hold the weights that led there (kept, skipped on resume); ' if marked else ''
  raise FloatingPointError(
      f'{what}; {suspects}{resume}. Lower config.train.base_learning_rate or add config.train.warmup_steps.')


def _initial_state(config, model, tx, mesh, ckpt: checkpoint.Checkpointer) -> TrainState:
  """Fresh state, then the newest intact checkpoint of the run, else `config.init_from` weights."""
  state = create_train_state(config, model, tx, mesh)
  restored = ckpt.restore_latest_intact(state.variables(), {'step': state.step, 'opt_state': state.opt_state},
                                        config, set_aside_skipped=True)
  if restored is not None:
    logging.info('Resuming from %s/%d.', ckpt.directory, restored.step)
    return state.replace(step=restored.train_state['step'], opt_state=restored.train_state['opt_state'],
                         **restored.variables)
  if config.init_from:
    variables, report = checkpoint.load_pretrained(
        config.init_from, state.variables(), config.init_from_scope,
        backbone_scope=models.backbone_scope(config.model), min_loaded_fraction=config.init_from_min_fraction)
    logging.info('init_from %s: loaded %d, skipped %d %s, new %d %s', config.init_from,
                 len(report['loaded']), len(report['skipped']), report['skipped'][:5],
                 len(report['new']), report['new'][:5])
    return state.replace(**variables)
  return state


def _log_eval(writer, summary: dict, panels: list, step: int, workdir: str) -> None:
  logging.info('step %d eval: mIoU %.4f, pixel accuracy %.4f (%d images, %.1fs)\n%s', step,
               summary['miou'], summary['pixel_accuracy'], summary['num_images'], summary['seconds'],
               metrics.format_iou_table(summary))
  if jax.process_index() != 0:
    return
  writer.add_scalar('eval/miou', summary['miou'], step)
  writer.add_scalar('eval/pixel_accuracy', summary['pixel_accuracy'], step)
  for name, iou in summary['per_class_iou'].items():
    if np.isfinite(iou):
      writer.add_scalar(f'eval_iou/{name}', iou, step)
  for index, panel in enumerate(panels):
    writer.add_image(f'eval_images/{index}', panel, step)
  writer.flush()
  evaluate.save_panels(panels, f'{workdir}/predictions/step_{step:07d}')
  evaluate.write_summary(summary, step, workdir)


def _log_train(writer, means: dict, step: int, progress) -> None:
  logging.info('step %d: loss %.4f (total %.4f), lr %.3g, pixel acc %.3f, %.2f steps/s, %.1f images/s',
               step, means['loss'], means['total_loss'], means['learning_rate'], means['pixel_accuracy'],
               means['steps_per_second'], means['images_per_second'])
  progress.set_postfix(loss=f'{means["loss"]:.3f}')
  if writer is not None:
    for key, value in means.items():
      writer.add_scalar(f'train/{key}', value, step)
    writer.flush()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, run_eval: bool = True) -> dict:
  """Trains `config` in `workdir` (resuming from its newest intact checkpoint) and evaluates periodically.

  One run at a time holds `workdir` (a second one stops at once, naming the holder). Any failure to write a
  checkpoint, events or images stops the run with the path and the cause; SIGINT/SIGTERM finish the current
  step, write a checkpoint and raise `TrainingInterrupted`.

  Returns:
    The last eval summary (empty if `run_eval` is False).
  """
  validate_config(config)
  with run_lock.hold(workdir, enabled=jax.process_index() == 0):
    dataset = input_pipeline.load_dataset(config)  # missing or mismatched data stops the run before compiling
    mesh = create_mesh()
    model = create_model(config.model)
    tx, schedule = optim.create_optimizer(config.train)
    evaluator = evaluate.Evaluator(config, mesh, dataset) if run_eval else None
    ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    writer = summary_writer.SummaryWriter(workdir) if jax.process_index() == 0 else None
    try:
      with _StopSignals() as signals:
        return _train_loop(config, workdir, dataset, mesh, model, tx, schedule, evaluator, ckpt, writer,
                           signals)
    finally:  # a failing or interrupted run still finalises the checkpoint being written
      try:
        ckpt.close()
      finally:
        if writer is not None:
          writer.close()


def _train_loop(config, workdir, dataset, mesh, model, tx, schedule, evaluator, ckpt, writer, signals) -> dict:
  t = config.train
  state = _initial_state(config, model, tx, mesh, ckpt)
  start_step = int(state.step)
  p_train_step = make_train_step(config, model, tx, schedule, mesh)
  batches = input_pipeline.create_train_iterator(config, dataset, start_step=start_step,
                                                 process_index=jax.process_index(),
                                                 process_count=jax.process_count())
  progress = tqdm.tqdm(total=t.num_steps, initial=start_step, unit='step', dynamic_ncols=True,
                       disable=not (writer is not None and sys.stderr.isatty()))
  history, summary, last_log = [], {}, (time.time(), start_step)
  logging.info('Training %s from step %d to %d on %d devices (%d processes), global batch %d.',
               config.model.backbone, start_step, t.num_steps, jax.device_count(), jax.process_count(),
               t.batch_size)

  def save(step, eval_summary=None):
    try:
      ckpt.save(step, state.variables(), {'step': state.step, 'opt_state': state.opt_state}, config,
                metrics={checkpoint.BEST_METRIC: eval_summary['miou']} if eval_summary else None)
    except checkpoint.NonFiniteStateError as e:  # a finite loss, but the update overflowed the weights
      _diverged(ckpt, step + 1, f'The weights became non-finite at step {step} ({e})')

  try:
    for step in range(start_step + 1, t.num_steps + 1):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, step_metrics = p_train_step(state, input_pipeline.shard_batch(next(batches), mesh))
      history.append((step, step_metrics))
      progress.update(1)
      stop = signals.stop_requested(step, t.log_every_steps)
      last = step == t.num_steps
      do_eval = evaluator is not None and (step % t.eval_every_steps == 0 or last) and not stop
      do_save = do_eval or step % t.checkpoint_every_steps == 0 or last or stop
      if step % t.log_every_steps == 0 or do_save:
        means = _check_finite(history, ckpt)
        history = []
        ckpt.check_for_errors()  # a failed background write stops the run now, naming the path
        seconds, steps_done = time.time() - last_log[0], step - last_log[1]
        last_log = (time.time(), step)
        means['steps_per_second'] = steps_done / seconds
        means['images_per_second'] = steps_done * t.batch_size / seconds
        _log_train(writer, means, step, progress)
      if do_eval:
        summary, panels = evaluator.run(state.variables(), config.eval.num_images_to_save)
        _log_eval(writer, summary, panels, step, workdir)
        last_log = (time.time(), step)  # eval time is not training speed
      if do_save:
        save(step, summary if do_eval else None)
      if stop:
        ckpt.wait()
        raise TrainingInterrupted(stop, step, ckpt.directory)
    if evaluator is not None and not summary and start_step >= t.num_steps:
      summary, panels = evaluator.run(state.variables(), config.eval.num_images_to_save)
      _log_eval(writer, summary, panels, start_step, workdir)
  finally:
    progress.close()
  return summary
