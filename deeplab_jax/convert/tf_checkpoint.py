"""Imports official TF1 DeepLab checkpoints (`model.ckpt-N.index` + `.data-*`).

Covers the model zoo's trained models (Xception-65 VOC/Cityscapes/ADE20K, MobileNetV2 1.0 and 0.5) and its
ImageNet backbones (`xception_{41,65,71}`, `resnet_v1_{50,101}_beta`). Reading needs TensorFlow
(`pip install 'deeplab_jax[tf]'`); the names are mapped by `tf_names`, and every variable must find its
parameter: an unmapped or missing variable, or a shape that disagrees with the config, is an error that
lists them. ImageNet checkpoints bring their classifier (`<backbone>/logits`, MobileNetV2's `Conv_1` and
`Logits`), which DeepLab does not use: those are reported as skipped, and the heads are left new.
"""
import glob
import os
import re
from typing import Dict, List, Tuple

import ml_collections
import numpy as np

from deeplab_jax import models
from deeplab_jax.convert import common

ConversionError = common.ConversionError


def checkpoint_prefix(path: str) -> str:
  """`model.ckpt-N` from the prefix itself, its `.index`/`.data-*` file, or the directory holding it.

  Raises:
    ConversionError: if no checkpoint (or more than one, for a directory) is found.
  """
  if os.path.isdir(path):
    indices = sorted(glob.glob(os.path.join(path, '*.index')))
    state = os.path.join(path, 'checkpoint')
    if os.path.exists(state):  # the TF `checkpoint` state file names the latest one
      match = re.search(r'^model_checkpoint_path:\s*"(.+)"', open(state).read(), re.M)
      if match:
        latest = match.group(1)
        return latest if os.path.isabs(latest) else os.path.join(path, latest)
    if len(indices) != 1:
      raise ConversionError(f'{path} holds {len(indices)} TF checkpoints (*.index): pass the prefix of one, '
                            'e.g. .../model.ckpt-30000.')
    return indices[0][:-len('.index')]
  prefix = re.sub(r'\.(index|data-\d+-of-\d+)$', '', path)
  if not os.path.exists(prefix + '.index'):
    raise ConversionError(f'No TF checkpoint at {path}: expected {prefix}.index and {prefix}.data-*.')
  return prefix


def read_tf_checkpoint(path: str) -> Dict[str, np.ndarray]:
  """`{variable name: array}` of a TF checkpoint (needs TensorFlow)."""
  prefix = checkpoint_prefix(path)
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError('Reading TF checkpoints needs TensorFlow: pip install "deeplab_jax[tf]" '
                          '(tensorflow-cpu).') from e
  reader = tf.train.load_checkpoint(prefix)
  return {name: np.asarray(reader.get_tensor(name))
          for name in sorted(reader.get_variable_to_shape_map())}


def split_classifier(tf_arrays: Dict[str, np.ndarray], model_config: ml_collections.ConfigDict
                     ) -> Tuple[Dict[str, np.ndarray], List]:
  """Sets the backbone's ImageNet classifier variables aside: `(remaining arrays, [(name, reason)])`."""
  spec = models.backbone_spec(model_config)
  kept, skipped = {}, []
  for name, value in tf_arrays.items():
    if spec.is_imagenet_classifier(name):
      skipped.append((name, 'ImageNet classifier, not part of DeepLab'))
    else:
      kept[name] = value
  return kept, skipped


def convert_tf_checkpoint(path: str, config: ml_collections.ConfigDict, scope: str = 'auto'
                          ) -> Tuple[dict, dict]:
  """Reads a TF checkpoint and returns `(variables, report)` for `config.model` (see `common.assign`)."""
  arrays, skipped = split_classifier(read_tf_checkpoint(path), config.model)
  variables, report = common.assign(arrays, config.model, scope, skipped)
  report.update(format='tf_checkpoint', source=checkpoint_prefix(path))
  return variables, report
