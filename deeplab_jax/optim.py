"""The official DeepLab optimizer: SGD with momentum on a poly learning-rate schedule.

Follows tensorflow/models `research/deeplab/train.py` and `utils/train_utils.py`:
  * `lr(step) = base_lr * (1 - step / num_steps) ** power` (`tf.train.polynomial_decay`, end rate 0);
  * optional linear warm-up (the official `slow_start_burnin_type='linear'`): from `warmup_start_learning_rate`
    to `base_lr` over `warmup_steps`, after which the poly decay runs over the remaining steps;
  * `tf.train.MomentumOptimizer` (`accum = momentum * accum + grad; w -= lr * accum`), which is `optax.sgd`;
  * gradients of conv `biases` doubled (`_get_gradient_multipliers`); BatchNorm beta is not a bias there.
The L2 weight decay is part of the loss (see `losses.l2_regularization`), as in the official graph.
"""
from typing import Any

import jax
import ml_collections
import optax

PyTree = Any

BIAS_GRADIENT_MULTIPLIER = 2.0


def poly_schedule(base_learning_rate: float, num_steps: int, power: float = 0.9, warmup_steps: int = 0,
                  warmup_start_learning_rate: float = 0.0) -> optax.Schedule:
  """Poly decay to 0 at `num_steps`, after an optional linear warm-up of `warmup_steps`."""
  if num_steps <= 0:
    raise ValueError(f'config.train.num_steps must be positive, got {num_steps}.')
  if not 0 <= warmup_steps < num_steps:
    raise ValueError(f'config.train.warmup_steps must be in [0, num_steps={num_steps}), got {warmup_steps}.')
  decay = optax.polynomial_schedule(init_value=base_learning_rate, end_value=0.0, power=power,
                                    transition_steps=num_steps - warmup_steps)
  if warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(warmup_start_learning_rate, base_learning_rate, warmup_steps)
  return optax.join_schedules([warmup, decay], boundaries=[warmup_steps])


def is_conv_bias(path) -> bool:
  """True for a convolution `bias` (TF `biases`); BatchNorm's `bias` is TF `beta` and keeps multiplier 1."""
  names = [str(getattr(key, 'key', getattr(key, 'name', key))) for key in path]
  return bool(names) and names[-1] == 'bias' and not any(n.endswith('BatchNorm') for n in names[:-1])


def scale_bias_gradients(multiplier: float = BIAS_GRADIENT_MULTIPLIER) -> optax.GradientTransformation:
  """Multiplies the gradients of conv biases by `multiplier` (the official trainer's 2x for `biases`)."""

  def update_fn(updates, state, params=None):
    del params
    scaled = jax.tree_util.tree_map_with_path(
        lambda path, g: g * multiplier if is_conv_bias(path) else g, updates)
    return scaled, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _check_train_config(train: ml_collections.ConfigDict) -> None:
  if train.base_learning_rate <= 0:
    raise ValueError(f'config.train.base_learning_rate must be positive, got {train.base_learning_rate}.')
  if not 0.0 <= train.momentum < 1.0:
    raise ValueError(f'config.train.momentum must be in [0, 1), got {train.momentum}.')
  if train.learning_power <= 0:
    raise ValueError(f'config.train.learning_power must be positive, got {train.learning_power}.')
  if train.weight_decay < 0:
    raise ValueError(f'config.train.weight_decay must be >= 0, got {train.weight_decay}.')


def create_optimizer(train: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer of `config.train` and its learning-rate schedule (for logging).

  Args:
    train: `config.train` (base_learning_rate, num_steps, learning_power, warmup_steps,
      warmup_start_learning_rate, momentum).
  """
  _check_train_config(train)
  schedule = poly_schedule(train.base_learning_rate, train.num_steps, train.learning_power,
                           train.warmup_steps, train.warmup_start_learning_rate)
  tx = optax.chain(scale_bias_gradients(), optax.sgd(schedule, momentum=train.momentum or None))
  return tx, schedule
