"""The name and layout map between official TF DeepLab checkpoints and this library's variables.

Our parameter paths are the TF names by construction (see models/layers.py); the map only renames the
leaves, moves the ASPP scopes under `aspp/`, and transposes depthwise kernels:

  TF                                         ours (collection, '/'-joined path)
  <scope>/weights                [kh,kw,i,o]  params       <scope>/kernel          [kh,kw,i,o]
  <scope>/depthwise_weights      [kh,kw,C,1]  params       <scope>/kernel          [kh,kw,1,C]
  <scope>/biases                              params       <scope>/bias
  <scope>/BatchNorm/gamma | beta              params       <scope>/BatchNorm/scale | bias
  <scope>/BatchNorm/moving_mean | _variance   batch_stats  <scope>/BatchNorm/mean | var
  image_pooling, aspp<i>[_depthwise|_pointwise], concat_projection  ->  aspp/<same>
"""
import re
from typing import Any, Callable, Dict, List, Mapping, Tuple

import flax
import numpy as np

_LEAVES = {
    'weights': ('params', 'kernel'),
    'depthwise_weights': ('params', 'kernel'),
    'biases': ('params', 'bias'),
    'gamma': ('params', 'scale'),
    'beta': ('params', 'bias'),
    'moving_mean': ('batch_stats', 'mean'),
    'moving_variance': ('batch_stats', 'var'),
}
_ASPP_SCOPE = re.compile(r'^(image_pooling|aspp\d+(_depthwise|_pointwise)?|concat_projection)/')
# Variables of TF training graphs that are not model weights.
IGNORED_TF_VARIABLES = re.compile(r'(^global_step$|/Momentum$|/ExponentialMovingAverage$|/Adam(_1)?$)')


class ConversionError(ValueError):
  """The checkpoint and the model disagree; the message lists every offending name."""


def tf_to_ours(tf_name: str) -> Tuple[str, str, Callable[[np.ndarray], np.ndarray]]:
  """Maps a TF variable name to (collection, '/'-joined path, array transform)."""
  scope, leaf = tf_name.rsplit('/', 1)
  if leaf not in _LEAVES:
    raise ConversionError(f'TF variable {tf_name!r} has an unknown kind {leaf!r}.')
  collection, our_leaf = _LEAVES[leaf]
  if _ASPP_SCOPE.match(tf_name):
    scope = 'aspp/' + scope
  transform = (lambda a: np.transpose(a, (0, 1, 3, 2))) if leaf == 'depthwise_weights' else (
      lambda a: a)
  return collection, f'{scope}/{our_leaf}', transform


def flat_variables(variables: Mapping) -> Dict[Tuple[str, str], Any]:
  """{(collection, '/'-joined path): leaf} of a variables pytree (arrays or shapes)."""
  return {(collection, path): leaf for collection in ('params', 'batch_stats')
          for path, leaf in flax.traverse_util.flatten_dict(dict(variables.get(collection, {})),
                                                            sep='/').items()}


def _count_by_scope(names: List[str]) -> str:
  """'xception_65: 698, decoder: 20' -- how many names fall under each top-level scope."""
  counts: Dict[str, int] = {}
  for name in names:
    top = name.split('/', 1)[0]
    counts[top] = counts.get(top, 0) + 1
  return 'by top scope: ' + ', '.join(f'{k}: {v}' for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def assign_tf_arrays(tf_arrays: Mapping[str, np.ndarray], target_variables: Mapping,
                     *, prefix_filter: Callable[[str], bool] = None) -> Tuple[dict, Dict[str, List]]:
  """Builds our variables from TF arrays, checking names and shapes both ways.

  Args:
    tf_arrays: {TF variable name: array}; optimizer slots and global_step are ignored.
    target_variables: the model's variables (arrays or ShapeDtypeStructs) giving the expected tree.
    prefix_filter: if given, only our paths for which it is True must be covered (e.g. backbone-only
      ImageNet checkpoints); TF variables outside it are reported as skipped.

  Returns:
    (variables, report) with report keys 'loaded', 'skipped' (TF names not used), 'new' (our paths
    left at their target values).

  Raises:
    ConversionError: listing unmapped TF names, shape mismatches, and (without `prefix_filter`) our
      variables the checkpoint does not provide.
  """
  targets = {key: tuple(leaf.shape) for key, leaf in flat_variables(target_variables).items()}
  flat = {key: np.asarray(leaf) for key, leaf in flat_variables(target_variables).items()}
  report = {'loaded': [], 'skipped': [], 'new': []}
  unmapped, mismatched, used, seen_with_other_shape = [], [], set(), set()
  for tf_name, array in sorted(tf_arrays.items()):
    if IGNORED_TF_VARIABLES.search(tf_name):
      continue
    try:
      collection, path, transform = tf_to_ours(tf_name)
    except ConversionError:
      unmapped.append(tf_name)
      continue
    if (collection, path) not in targets:
      unmapped.append(tf_name)
      continue
    if prefix_filter is not None and not prefix_filter(path):
      report['skipped'].append(tf_name)
      continue
    value = transform(np.asarray(array))
    expected = targets[(collection, path)]
    if tuple(value.shape) != expected:
      mismatched.append(f'{tf_name}: checkpoint {tuple(np.shape(array))} -> ours {path} {expected}')
      seen_with_other_shape.add((collection, path))
      continue
    flat[(collection, path)] = value.astype(np.float32)
    used.add((collection, path))
    report['loaded'].append(tf_name)
  missing = [f'{c}:{p}' for (c, p) in targets
             if (c, p) not in used and (c, p) not in seen_with_other_shape
             and (prefix_filter is None or prefix_filter(p))]
  report['new'] = [f'{c}:{p}' for (c, p) in targets
                   if (c, p) not in used and prefix_filter is not None and not prefix_filter(p)]
  problems = []
  if unmapped:
    problems.append(f'{len(unmapped)} checkpoint variables have no place in this model '
                    f'({_count_by_scope(unmapped)}):\n  ' + '\n  '.join(unmapped[:50]))
  if mismatched:
    problems.append(f'{len(mismatched)} shapes disagree with the config:\n  '
                    + '\n  '.join(mismatched[:50]))
  if missing:
    problems.append(f'{len(missing)} model variables are missing from the checkpoint '
                    f'({_count_by_scope([m.split(":", 1)[1] for m in missing])}):\n  '
                    + '\n  '.join(missing[:50]))
  if problems:
    raise ConversionError('Checkpoint does not match the model config (wrong --config for this '
                          'checkpoint?).\n' + '\n'.join(problems))
  # Module names hold '/' (TF scopes), so rebuild the tree on the target's own keys, not by splitting names.
  variables = {c: flax.traverse_util.path_aware_map(lambda key, _, c=c: flat[(c, '/'.join(key))],
                                                    dict(target_variables[c]))
               for c in ('params', 'batch_stats') if c in target_variables}
  return variables, report
