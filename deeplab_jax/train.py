"""Training: data-parallel `jax.jit` over a device mesh, the official DeepLab loss and optimizer.

The batch is sharded on the mesh's `data` axis and the state is replicated, so XLA inserts the gradient
all-reduce and BatchNorm statistics cover the global batch, exactly as one device with the whole batch.
Each step's dropout key is `fold_in(key(seed), step)` and the input pipeline restarts at the saved step, so a
resumed run continues the same sequence.
"""
import functools
import sys
import time
from typing import Any, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax
import tensorboardX
import tqdm

from deeplab_jax import checkpoint
from deeplab_jax import evaluate
from deeplab_jax import input_pipeline
from deeplab_jax import losses
from deeplab_jax import metrics
from deeplab_jax import optim
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
                 donate_argnums=(0,))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles each process's `[B_local, ...]` arrays into global arrays sharded on `data`."""
  sharding = NamedSharding(mesh, P('data'))
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(local_batch[key]))
          for key in ('image', 'label')}


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


def _check_finite(history: list, latest_checkpoint: Optional[int]) -> dict:
  """Host copies of buffered step metrics; stops the run at the first non-finite loss."""
  fetched = jax.device_get(history)
  for step, step_metrics in fetched:
    if not np.isfinite(step_metrics['total_loss']):
      raise FloatingPointError(
          f'The training loss became {step_metrics["total_loss"]} at step {step} (learning rate '
          f'{step_metrics["learning_rate"]:.3g}); the last checkpoint is step {latest_checkpoint}. Lower '
          'config.train.base_learning_rate or add config.train.warmup_steps.')
  return {key: float(np.mean([m[key] for _, m in fetched])) for key in fetched[-1][1]}


def _initial_state(config, model, tx, mesh, ckpt: checkpoint.Checkpointer) -> TrainState:
  """Fresh state, then the latest checkpoint of the run, else `config.init_from` weights."""
  state = create_train_state(config, model, tx, mesh)
  latest = ckpt.latest_step()
  if latest is not None:
    variables, train_state = ckpt.restore(latest, state.variables(),
                                          {'step': state.step, 'opt_state': state.opt_state}, config)
    logging.info('Resuming from %s/%d.', ckpt.directory, latest)
    return state.replace(step=train_state['step'], opt_state=train_state['opt_state'], **variables)
  if config.init_from:
    variables, report = checkpoint.load_pretrained(config.init_from, state.variables(),
                                                   config.init_from_scope)
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
    writer.add_image(f'eval_images/{index}', panel, step, dataformats='HWC')
  evaluate.save_panels(panels, f'{workdir}/predictions/step_{step:07d}')
  evaluate.write_summary(summary, step, workdir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, run_eval: bool = True) -> dict:
  """Trains `config` in `workdir` (resuming from its last checkpoint) and evaluates periodically.

  Returns:
    The last eval summary (empty if `run_eval` is False).
  """
  validate_config(config)
  input_pipeline.load_dataset_info(config)  # missing or mismatched data stops the run before compiling
  mesh = create_mesh()
  t = config.train
  model = create_model(config.model)
  tx, schedule = optim.create_optimizer(t)
  evaluator = evaluate.Evaluator(config, mesh) if run_eval else None
  ckpt = checkpoint.Checkpointer(workdir, keep=t.keep_checkpoints)
  state = _initial_state(config, model, tx, mesh, ckpt)
  start_step = int(state.step)
  p_train_step = make_train_step(config, model, tx, schedule, mesh)
  batches = input_pipeline.create_train_iterator(config, start_step=start_step,
                                                 process_index=jax.process_index(),
                                                 process_count=jax.process_count())
  is_chief = jax.process_index() == 0
  writer = tensorboardX.SummaryWriter(workdir) if is_chief else None
  progress = tqdm.tqdm(total=t.num_steps, initial=start_step, unit='step', dynamic_ncols=True,
                       disable=not (is_chief and sys.stderr.isatty()))
  history, summary, last_log = [], {}, (time.time(), start_step)
  logging.info('Training %s from step %d to %d on %d devices (%d processes), global batch %d.',
               config.model.backbone, start_step, t.num_steps, jax.device_count(), jax.process_count(),
               t.batch_size)
  try:
    for step in range(start_step + 1, t.num_steps + 1):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, step_metrics = p_train_step(state, global_batch(next(batches), mesh))
      history.append((step, step_metrics))
      progress.update(1)
      last = step == t.num_steps
      do_eval = run_eval and (step % t.eval_every_steps == 0 or last)
      do_save = do_eval or step % t.checkpoint_every_steps == 0 or last
      if step % t.log_every_steps == 0 or do_save:
        means = _check_finite(history, ckpt.latest_step())
        history = []
        seconds, steps_done = time.time() - last_log[0], step - last_log[1]
        last_log = (time.time(), step)
        means['steps_per_second'] = steps_done / seconds
        means['images_per_second'] = steps_done * t.batch_size / seconds
        logging.info('step %d: loss %.4f (total %.4f), lr %.3g, pixel acc %.3f, %.2f steps/s, %.1f images/s',
                     step, means['loss'], means['total_loss'], means['learning_rate'],
                     means['pixel_accuracy'], means['steps_per_second'], means['images_per_second'])
        progress.set_postfix(loss=f'{means["loss"]:.3f}')
        if is_chief:
          for key, value in means.items():
            writer.add_scalar(f'train/{key}', value, step)
      if do_eval:
        summary, panels = evaluator.run(state.variables(), config.eval.num_images_to_save)
        _log_eval(writer, summary, panels, step, workdir)
        last_log = (time.time(), step)  # eval time is not training speed
      if do_save:
        ckpt.save(step, state.variables(), {'step': state.step, 'opt_state': state.opt_state}, config,
                  metrics={checkpoint.BEST_METRIC: summary['miou']} if do_eval else None)
    if run_eval and not summary and start_step >= t.num_steps:
      summary, panels = evaluator.run(state.variables(), config.eval.num_images_to_save)
      _log_eval(writer, summary, panels, start_step, workdir)
  finally:  # a failing or interrupted run still finalises the checkpoint being written
    progress.close()
    ckpt.close()
    if writer is not None:
      writer.close()
  return summary
