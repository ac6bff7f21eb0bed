"""Counts the multiply-adds of DeepLab inference, per module, without compiling anything.

    python -m deeplab_jax.flops --config=configs/voc_xception.py [--output_stride=8] \
        [--eval_scales=0.5,0.75,1.0,1.25,1.5,1.75] [--flip]

prints a per-module table and ends with the line `multiply-adds: <billions>B`.

How: `model.apply(variables, images, train=False)` is traced with `jax.make_jaxpr` on abstract
inputs (`jax.ShapeDtypeStruct`; variables from `jax.eval_shape(model.init, ...)`), so a full
Xception-65 at 513x513 costs a one-second trace, not a compile. The jaxpr is walked recursively
(jit, closed_call, custom_jvp/custom_vjp, remat, scan and cond sub-jaxprs; a scan body counts
`length` times, a cond its most expensive branch; a while_loop is refused, its trip count being
unknown) and every contraction counts as multiply-adds:

  * `conv_general_dilated`: output elements x kernel window (kh * kw) x kernel input channels, which
    are already Cin / feature_group_count, so a depthwise conv costs kh * kw per output element.
    Atrous rates do not change the count, and padded borders count the full window (as TF's
    profiler counts Conv2D and DepthwiseConv2dNative).
  * `dot_general`: output elements x contracted size (Dense layers, einsum-based convs).

Convention: only learned layers count, i.e. contractions whose two operands both depend on the
images or the variables. A contraction with an input-independent constant is a fixed resampling --
the align-corners bilinear resizes, which the model writes as two einsums with interpolation
matrices -- and is left out, like every elementwise op (BatchNorm, ReLU, residual sums,
preprocessing) and the pooling reductions. This is the convention of the published model-zoo
figures at 513x513 (tests/flops_test.py):

  model (VOC, 513x513)                          published  counted   with resizes
  Xception-65 V3+ (sep. ASPP, decoder), OS16     54.17B     54.04B    55.10B
  Xception-65 V3+ (sep. ASPP, decoder), OS8     177.10B    176.85B   178.16B
  MobileNetV2 V3, depth multiplier 1.0, OS16      2.75B      2.74B     2.93B (+6.7%)
  MobileNetV2 V3, depth multiplier 0.5, OS16      0.88B      0.87B     1.06B (+21%)
  MobileNetV2 V3, OS8, 6 scales + flip          152.59B    152.33B
  Xception-65 V3+, OS8, 6 scales + flip        3055.35B   3052.36B

Counting the resize einsums as well (`include_resize=True`, `--include_resize`) adds the logits
upsampling to the input size, which is large next to MobileNetV2's convs and misses its figures.

The model is counted with `depthwise_impl='grouped'`: the CPU 'shifted' depthwise implementation is
elementwise multiply/adds, which would vanish from a count of contractions.

Multi-scale / flip: for each eval scale s the image is resized to `scale_dimension(crop, s) =
int((crop - 1) * s + 1)` per side (the official eval), a flipped copy costs the same again, and the
figure is the sum over all evaluated inputs (the resizes between scales are not counted).

The per-module breakdown groups each counted op by the Flax module path on JAX's name stack (Flax
linen pushes each module's name when it is called): the root module's class name is stripped, names
that are not identifiers (the einsum specs jnp.einsum pushes) are dropped, and the path is cut to
`depth` names (default 3: `xception_65/entry_flow/block1`, `aspp/aspp0`, `logits/semantic`). Ops of
the root module itself are listed as `(top level)`.
"""
from __future__ import annotations

import collections
import functools
import math
from typing import Any, NamedTuple, Sequence

from absl import app
from absl import flags
import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from deeplab_jax.models import create_model
from deeplab_jax.models import layers


# Module names per breakdown row: e.g. `xception_65/entry_flow/block1`, `aspp/aspp0`.
DEFAULT_DEPTH = 3

# The label of ops that sit directly in the root module (e.g. the final logits upsampling).
TOP_LEVEL = '(top level)'


class InferenceCount(NamedTuple):
  """Multiply-adds of one evaluation (all scales and flips of one image).

  Attributes:
    total: multiply-adds summed over every evaluated input.
    breakdown: module path -> multiply-adds, summed over every evaluated input, in module order.
    per_input: `(height, width, flipped, multiply_adds)` per evaluated input, in evaluation order.
  """
  total: int
  breakdown: dict[str, int]
  per_input: list[tuple[int, int, bool, int]]


def _conv_macs(eqn: jcore.JaxprEqn) -> int:
  """Output elements x kernel window x kernel input channels of a `conv_general_dilated`."""
  out_shape = eqn.outvars[0].aval.shape
  rhs_shape = eqn.invars[1].aval.shape
  rhs_spec = eqn.params['dimension_numbers'].rhs_spec  # (out feature, in feature, *spatial) dims.
  window = math.prod(rhs_shape[d] for d in rhs_spec[2:])
  return math.prod(out_shape) * window * rhs_shape[rhs_spec[1]]


def _dot_macs(eqn: jcore.JaxprEqn) -> int:
  """Output elements x contracted size of a `dot_general`."""
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  lhs_shape = eqn.invars[0].aval.shape
  return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs_shape[d] for d in lhs_contract)


_CONTRACTIONS = {'conv_general_dilated': _conv_macs, 'dot_general': _dot_macs}


def _module_path(names: Sequence[str], root: str) -> tuple[str, ...]:
  """Module names of a name stack: root class stripped, non-identifiers (einsum specs) dropped."""
  names = list(names)
  if names and names[0] == root:
    names = names[1:]
  return tuple(n for n in names if n.isidentifier())


class _Counter:
  """Accumulates multiply-adds per module path while walking a jaxpr."""

  def __init__(self, root: str, include_resize: bool):
    self.root = root
    self.include_resize = include_resize

  def walk(self, jaxpr: jcore.Jaxpr, dynamic_in: Sequence[bool], prefix: tuple[str, ...],
           multiplier: int) -> tuple[collections.OrderedDict, list[bool]]:
    """Counts `jaxpr` run `multiplier` times.

    Args:
      jaxpr: the (open) jaxpr to walk.
      dynamic_in: per invar, whether it depends on the images or the variables (constvars never do).
      prefix: name stack of the equation calling this jaxpr (sub-jaxpr name stacks are relative).
      multiplier: how many times this jaxpr runs (scan trip counts multiply).

    Returns:
      (module path -> multiply-adds in first-seen order, per outvar whether it is dynamic).
    """
    counts = collections.OrderedDict()
    dynamic = {v for v, d in zip(jaxpr.invars, dynamic_in) if d}

    def is_dynamic(atom) -> bool:
      return not isinstance(atom, jcore.Literal) and atom in dynamic

    for eqn in jaxpr.eqns:
      in_dynamic = [is_dynamic(v) for v in eqn.invars]
      names = prefix + tuple(n for n in str(eqn.source_info.name_stack).split('/') if n)
      out_dynamic = [any(in_dynamic)] * len(eqn.outvars)
      macs_fn = _CONTRACTIONS.get(eqn.primitive.name)
      if macs_fn is not None:
        # Both operands data-dependent: a learned layer. A constant operand: a fixed resampling.
        if all(in_dynamic[:2]) or self.include_resize:
          _add(counts, _module_path(names, self.root), macs_fn(eqn) * multiplier)
      else:
        sub_counts, sub_out_dynamic = self._sub_jaxprs(eqn, in_dynamic, names, multiplier)
        for path, macs in sub_counts.items():
          _add(counts, path, macs)
        out_dynamic = sub_out_dynamic or out_dynamic
      dynamic.update(v for v, d in zip(eqn.outvars, out_dynamic) if d)
    return counts, [is_dynamic(v) for v in jaxpr.outvars]

  def _sub_jaxprs(self, eqn, in_dynamic, names, multiplier):
    """Counts the sub-jaxprs of a higher-order equation; (counts, outvar dynamics or None)."""
    params = eqn.params
    name = eqn.primitive.name
    if name == 'while':
      raise ValueError(
          'The model contains a while_loop, whose trip count is only known at run time, so its '
          'multiply-adds cannot be counted by tracing; use a scan (or a fori_loop with static '
          'bounds, which is a scan).')
    if name == 'cond':
      # The index operand comes first; every branch takes the remaining operands. Count the most
      # expensive branch: an upper bound that is exact when the branches cost the same.
      best = None
      for branch in params['branches']:
        counts, out_dyn = self._closed(branch, in_dynamic[1:], names, multiplier)
        if best is None or sum(counts.values()) > sum(best[0].values()):
          best = (counts, out_dyn)
      return best
    if name == 'scan':
      return self._closed(params['jaxpr'], in_dynamic, names, multiplier * params['length'],
                          carry=(params['num_consts'], params['num_carry']))
    # jit, closed_call, custom_jvp/vjp, remat: the sub-jaxpr takes the equation's operands.
    total = collections.OrderedDict()
    out_dyn = None
    for jaxpr in jcore.jaxprs_in_params(params):
      if len(jaxpr.invars) == len(in_dynamic):
        sub_in = in_dynamic
      else:
        sub_in = [any(in_dynamic)] * len(jaxpr.invars)
      counts, jaxpr_out_dyn = self.walk(jaxpr, sub_in, names, multiplier)
      for path, macs in counts.items():
        _add(total, path, macs)
      if len(jaxpr_out_dyn) == len(eqn.outvars):
        out_dyn = jaxpr_out_dyn
    return total, out_dyn

  def _closed(self, closed, in_dynamic, names, multiplier, carry=None):
    """Walks a ClosedJaxpr; a scan carry is dynamic once any iteration makes it so."""
    jaxpr = closed.jaxpr
    in_dynamic = list(in_dynamic)
    if carry is not None:
      num_consts, num_carry = carry
      carry_slice = slice(num_consts, num_consts + num_carry)
      # Iterate to the fixed point: the carry's dynamism can only grow.
      while True:
        _, out_dyn = self.walk(jaxpr, in_dynamic, names, 1)
        new_carry = [a or b for a, b in zip(in_dynamic[carry_slice], out_dyn[:num_carry])]
        if new_carry == in_dynamic[carry_slice]:
          break
        in_dynamic[carry_slice] = new_carry
    return self.walk(jaxpr, in_dynamic, names, multiplier)


def _add(counts: dict[Any, int], key: Any, macs: int) -> None:
  counts[key] = counts.get(key, 0) + macs


def count_jaxpr(closed_jaxpr: jcore.ClosedJaxpr, *, root: str = '',
                depth: int | None = DEFAULT_DEPTH,
                include_resize: bool = False) -> tuple[int, dict[str, int]]:
  """Multiply-adds of a traced function, per module path.

  Args:
    closed_jaxpr: from `jax.make_jaxpr(fn)(*args)`; all its inputs count as data (the images and the
      variables), its constants as fixed.
    root: the root module's class name, stripped from the name stacks.
    depth: how many module names to keep in a breakdown key (None: all).
    include_resize: also count contractions against input-independent constants (resize einsums).

  Returns:
    (total multiply-adds, module path -> multiply-adds in first-seen order). Ops of the root
    module itself are under `TOP_LEVEL`.
  """
  counter = _Counter(root, include_resize)
  counts, _ = counter.walk(closed_jaxpr.jaxpr, [True] * len(closed_jaxpr.jaxpr.invars), (), 1)
  breakdown: dict[str, int] = {}
  for path, macs in counts.items():
    key = '/'.join(path[:depth] if depth else path) or TOP_LEVEL
    _add(breakdown, key, macs)
  return sum(breakdown.values()), breakdown


def _counting_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `model_config` whose depthwise convs are grouped convs, i.e. contractions."""
  model_config = ml_collections.ConfigDict(model_config.to_dict())
  model_config.depthwise_impl = 'grouped'
  return model_config


def count_multiply_adds(model_config: ml_collections.ConfigDict,
                        image_size: int | Sequence[int], *, output_stride: int | None = None,
                        depth: int | None = DEFAULT_DEPTH,
                        include_resize: bool = False) -> tuple[int, dict[str, int]]:
  """Multiply-adds of the model's inference on one `[1, H, W, 3]` image (traced, not compiled).

  Args:
    model_config: `config.model`; depthwise_impl is forced to 'grouped' on a copy.
    image_size: `H` or `(H, W)` of the input image.
    output_stride: overrides `model_config.output_stride` (atrous rates scale with it).
    depth: how many module names to keep in a breakdown key (None: all).
    include_resize: also count the bilinear-resize einsums (not the published convention).

  Returns:
    (total multiply-adds, module path -> multiply-adds in module order).
  """
  height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  model = create_model(_counting_config(model_config), output_stride=output_stride)
  images = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  variables = jax.eval_shape(functools.partial(model.init, train=False), rngs, images)
  apply = functools.partial(model.apply, train=False)
  closed_jaxpr = jax.make_jaxpr(apply)(variables, images)
  return count_jaxpr(closed_jaxpr, root=type(model).__name__, depth=depth,
                     include_resize=include_resize)


def count_inference(config: ml_collections.ConfigDict, output_stride: int | None = None,
                    scales: Sequence[float] | None = None, flip: bool | None = None, *,
                    depth: int | None = DEFAULT_DEPTH,
                    include_resize: bool = False) -> InferenceCount:
  """Multiply-adds of evaluating one image at `config.eval.crop_size`, over all scales and flips.

  Args:
    config: the full config (reads `config.model` and `config.eval`).
    output_stride: eval output stride; None: `config.eval.output_stride`.
    scales: eval scales; None: `config.eval.scales`. Each input is `scale_dimension(crop, s)` per
      side.
    flip: also evaluate the left-right flipped image (same cost again); None: `config.eval.flip`.
    depth: how many module names to keep in a breakdown key (None: all).
    include_resize: also count the bilinear-resize einsums (not the published convention).

  Returns:
    The `InferenceCount` summed over every evaluated input.
  """
  output_stride = config.eval.output_stride if output_stride is None else output_stride
  scales = tuple(config.eval.scales if scales is None else scales)
  flip = bool(config.eval.flip if flip is None else flip)
  crop_height, crop_width = config.eval.crop_size
  by_size = {}  # A flipped input, or a repeated scale, costs what its size costs.
  breakdown: dict[str, int] = {}
  per_input = []
  for scale in scales:
    size = (layers.scale_dimension(crop_height, scale),
            layers.scale_dimension(crop_width, scale))
    if size not in by_size:
      by_size[size] = count_multiply_adds(config.model, size, output_stride=output_stride,
                                          depth=depth, include_resize=include_resize)
    macs, size_breakdown = by_size[size]
    for flipped in (False, True) if flip else (False,):
      per_input.append((*size, flipped, macs))
      for key, value in size_breakdown.items():
        _add(breakdown, key, value)
  return InferenceCount(sum(m for *_, m in per_input), breakdown, per_input)


def format_report(count: InferenceCount) -> str:
  """The per-module table, the per-input figures, then the line `multiply-adds: <billions>B`."""
  width = max([len('module')] + [len(k) for k in count.breakdown])
  lines = [f'{"module":<{width}}  {"multiply-adds":>14}  {"share":>7}']
  for key, macs in count.breakdown.items():
    share = 100.0 * macs / count.total if count.total else 0.0
    lines.append(f'{key:<{width}}  {macs / 1e9:>13.4f}B  {share:>6.2f}%')
  lines.append('')
  for height, width_, flipped, macs in count.per_input:
    lines.append(f'input {height}x{width_}{" flipped" if flipped else ""}: {macs / 1e9:.2f}B')
  lines.append(f'multiply-adds: {count.total / 1e9:.2f}B')
  return '\n'.join(lines)


def main() -> None:
  """`python -m deeplab_jax.flops`: flags are defined here, never at import (the library stays importable)."""
  config = config_flags.DEFINE_config_file('config', None, 'Config file (ml_collections).',
                                           lock_config=True)
  output_stride = flags.DEFINE_integer(
      'output_stride', None, 'Eval output stride (default: config.eval.output_stride).')
  eval_scales = flags.DEFINE_list(
      'eval_scales', None, 'Comma-separated eval scales (default: config.eval.scales).')
  flip = flags.DEFINE_boolean(
      'flip', None, 'Also evaluate the flipped image (default: config.eval.flip).')
  depth = flags.DEFINE_integer('depth', DEFAULT_DEPTH, 'Module names per breakdown row (0: all).')
  include_resize = flags.DEFINE_boolean(
      'include_resize', False, 'Also count the bilinear-resize einsums (not the published figures).')
  flags.mark_flags_as_required(['config'])

  def run(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    scales = None if eval_scales.value is None else [float(s) for s in eval_scales.value]
    count = count_inference(config.value, output_stride.value, scales, flip.value,
                            depth=depth.value or None, include_resize=include_resize.value)
    print(format_report(count))

  app.run(run)


if __name__ == '__main__':
  main()
