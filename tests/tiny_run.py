"""The tiny training run the integration tests share: configs/tiny.py on 33x33 synthetic scenes.

`config(data_dir, **overrides)` for in-process runs, `flags(...)` for the same run through
`python -m deeplab_jax.main`, so both kinds of test train exactly the same thing.
"""
import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from deeplab_jax.models import create_model

# Dotted config fields -> values (data_dir is added per test).
OVERRIDES = {
    'model.depthwise_impl': 'grouped',  # compiles faster than the CPU default; training is the same
    'dataset.train_split': 'train', 'dataset.eval_split': 'val',
    'dataset.synthetic_image_size': 33, 'dataset.synthetic_num_train': 16, 'dataset.synthetic_num_val': 8,
    'dataset.num_workers': 0,
    'train.num_steps': 4, 'train.log_every_steps': 2, 'train.checkpoint_every_steps': 2,
    'train.eval_every_steps': 4, 'train.min_scale': 1.0, 'train.max_scale': 1.0,
    'eval.num_images_to_save': 2,
}


def _fields(data_dir: str, overrides: dict) -> dict:
  return {**OVERRIDES, 'dataset.data_dir': data_dir, **overrides}


def config(data_dir: str, **overrides):
  """The tiny config with `OVERRIDES`; extra overrides as keyword arguments `section__field=value`."""
  result = tiny.get_config()
  for key, value in _fields(data_dir, {k.replace('__', '.'): v for k, v in overrides.items()}).items():
    section, name = key.split('.')
    result[section][name] = value
  return result


def flags(data_dir: str, workdir: str, **overrides) -> list:
  """`deeplab_jax.main` flags for the same run."""
  fields = _fields(data_dir, {k.replace('__', '.'): v for k, v in overrides.items()})
  return ['--config=configs/tiny.py', f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in fields.items()]


def random_variables(config, seed=0):
  """Deterministic random weights for `config.model` without compiling `init` (slow on XLA:CPU)."""
  model = create_model(config.model)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 33, 33, 3)), train=False))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['var']"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif name.endswith("['scale']"):
      value = rng.uniform(0.8, 1.2, leaf.shape)
    elif name.endswith("['mean']") or name.endswith("['bias']"):
      value = rng.normal(0.0, 0.1, leaf.shape)
    else:  # conv kernels [kh, kw, in, out]
      value = rng.normal(0.0, 1.0, leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    return value.astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)
