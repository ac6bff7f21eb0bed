"""Imports the official DeepLab MobileNetV2 TFLite models (float, and uint8 quantization-aware).

The TFLite graphs have BatchNorm folded into each conv (kernel already scaled, BN shift in the conv bias)
and keep no variable names we can rely on, so the importer walks the graph structurally:

  * the conv ops (CONV_2D, DEPTHWISE_CONV_2D) in execution order are the backbone layers `MobilenetV2/Conv`,
    `expanded_conv*/{expand,depthwise,project}`; the conv after the AVERAGE_POOL_2D is `image_pooling`; the
    conv fed by the CONCATENATION is `concat_projection` (its input channel blocks are reordered if the
    concat is not `[image_pooling, aspp0]`); the other 1x1 conv of the backbone output is `aspp0`; the last
    conv is `logits/semantic`. Every kernel shape, stride, dilation and padding is checked against our model
    at the output stride the graph was exported with.
  * uint8 weights are dequantized (`(q - zero_point) * scale`, int32 biases `q * scale`).
  * folded BN becomes our BN form with identity statistics (gamma 1, moving mean 0, moving variance
    1 - epsilon, so `(x - 0) / sqrt(1 - eps + eps) * 1 + beta = x + beta` exactly) and beta = the folded bias:
    the converted model computes the same function and still trains (its BN layers learn from there).
  * activations are checked: the float graph fuses RELU6/RELU/NONE; the quantized graph fuses RELU6 but
    stores the head ReLUs as NONE with an output range starting at 0 (a ReLU implied by the uint8 range).
    Our model applies ReLU6/ReLU explicitly, as the official float model does.
  * the quantized graphs resize the image-pooling feature (1x1 -> 33x33) from a uint8 tensor with scale
    0.0124 into one labelled 0.0352 (dm 0.5: 0.0123 -> 0.0291); LiteRT's uint8 RESIZE_BILINEAR copies codes
    without requantizing, so the official runtime scales that branch by 2.84x (2.36x), which the graph does
    not mean (the TF fake-quant model resizes in float). By default the conversion keeps the graph's
    meaning; `match_runtime=True` folds the runtime's factor into `image_pooling`'s BN so that our float
    model reproduces the runtime's predictions.
"""
import dataclasses
from typing import Dict, List, Tuple

import ml_collections
import numpy as np

from deeplab_jax.convert import common
from deeplab_jax.convert import flatbuffer
from deeplab_jax.models import mobilenet_v2

ConversionError = common.ConversionError
_SUPPORTED_OPS = {'CONV_2D', 'DEPTHWISE_CONV_2D', 'ADD', 'AVERAGE_POOL_2D', 'MEAN', 'RESIZE_BILINEAR',
                  'CONCATENATION', 'ARG_MAX', 'DEQUANTIZE', 'QUANTIZE', 'RESHAPE'}
_HEAD = ('image_pooling', 'aspp0', 'concat_projection', 'logits/semantic')


@dataclasses.dataclass
class _Layer:
  """One of our conv layers: TF scope, expected activation, expected (stride, rate), depthwise or not."""
  scope: str
  activation: str
  stride: int
  rate: int
  depthwise: bool


def _our_layers(model_config: ml_collections.ConfigDict, output_stride: int) -> List[_Layer]:
  """Our MobileNetV2 DeepLab conv layers in execution order, for a graph exported at `output_stride`."""
  layers = [_Layer('MobilenetV2/Conv', 'RELU6', 2, 1, False)]
  in_depth = mobilenet_v2.stem_depth(model_config.depth_multiplier)
  for scope, expansion, outputs, stride, rate in mobilenet_v2.layer_schedule(
      model_config.depth_multiplier, output_stride):
    inner = in_depth if expansion == 1 else mobilenet_v2.make_divisible(in_depth * expansion, 8)
    if inner > in_depth:
      layers.append(_Layer(f'MobilenetV2/{scope}/expand', 'RELU6', 1, 1, False))
    layers.append(_Layer(f'MobilenetV2/{scope}/depthwise', 'RELU6', stride, rate, True))
    layers.append(_Layer(f'MobilenetV2/{scope}/project', 'NONE', 1, 1, False))
    in_depth = outputs
  layers += [_Layer('image_pooling', 'RELU', 1, 1, False), _Layer('aspp0', 'RELU', 1, 1, False),
             _Layer('concat_projection', 'RELU', 1, 1, False),
             _Layer('logits/semantic', 'NONE', 1, 1, False)]
  return layers


def _check_model_config(model_config: ml_collections.ConfigDict) -> None:
  m = model_config
  wrong = []
  if m.backbone != 'mobilenet_v2':
    wrong.append(f'backbone={m.backbone!r} (needs mobilenet_v2)')
  if m.head != 'aspp' or tuple(m.atrous_rates) or not m.aspp_with_image_pooling:
    wrong.append(f'head={m.head!r}, atrous_rates={tuple(m.atrous_rates)}, aspp_with_image_pooling='
                 f'{m.aspp_with_image_pooling} (needs aspp, (), True)')
  if m.decoder_output_stride:
    wrong.append(f'decoder_output_stride={m.decoder_output_stride} (needs 0: no decoder)')
  if m.logits_kernel_size != 1:
    wrong.append(f'logits_kernel_size={m.logits_kernel_size} (needs 1)')
  if wrong:
    raise ConversionError('The official DeepLab TFLite models are MobileNetV2 with image pooling + a 1x1 '
                          'ASPP branch and no decoder (configs/voc_mobilenetv2.py); this config has '
                          + '; '.join(wrong) + '.')


class _GraphView:
  """Producer/consumer lookups and constant resolution over a parsed TFLite graph."""

  def __init__(self, graph: flatbuffer.Graph):
    self.graph = graph
    self.producer = {t: op for op in graph.operators for t in op.outputs}
    self.consumers: Dict[int, list] = {}
    for op in graph.operators:
      for t in op.inputs:
        self.consumers.setdefault(t, []).append(op)

  def constant(self, index: int) -> np.ndarray:
    """A constant tensor as float32, looking through DEQUANTIZE ops (float16 / int8 weight storage)."""
    tensor = self.graph.tensors[index]
    if tensor.data is None and index in self.producer and self.producer[index].op == 'DEQUANTIZE':
      return self.constant(self.producer[index].inputs[0])
    return tensor.dequantized()

  def source_conv(self, index: int):
    """The conv op whose output reaches tensor `index` through resizes/quantize ops only (else None)."""
    op = self.producer.get(index)
    while op is not None and op.op in ('RESIZE_BILINEAR', 'QUANTIZE', 'DEQUANTIZE', 'RESHAPE'):
      op = self.producer.get(op.inputs[0])
    return op if op is not None and op.op in ('CONV_2D', 'DEPTHWISE_CONV_2D') else None


def _activation(graph: flatbuffer.Graph, op: flatbuffer.Operator) -> str:
  """The activation an op applies: fused, or implied by a quantized output range starting at 0."""
  fused = op.options.get('activation', 'NONE')
  if fused != 'NONE':
    return fused
  out = graph.tensors[op.outputs[0]]
  if out.quantized and out.zero_point.size and int(out.zero_point[0]) == 0 and out.dtype == np.uint8:
    upper = float(out.scale[0]) * 255.0
    return 'RELU6' if abs(upper - 6.0) < 1e-3 else 'RELU'
  return 'NONE'


def _requantizing_resizes(graph: flatbuffer.Graph) -> List[Tuple[flatbuffer.Operator, float, float]]:
  """uint8 RESIZE_BILINEAR ops whose output quantization differs from their input's: `(op, s_in, s_out)`.

  The TFLite uint8 resize kernels interpolate the raw codes and never requantize, so such an op multiplies
  its real values by `s_out / s_in` (plus a zero-point shift) in the runtime, while the graph (and the TF
  fake-quant model it came from) means a plain resize.
  """
  found = []
  for op in graph.operators:
    if op.op != 'RESIZE_BILINEAR':
      continue
    src, dst = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
    if src.quantized and dst.quantized and (
        not np.isclose(src.scale[0], dst.scale[0], rtol=1e-6) or src.zero_point[0] != dst.zero_point[0]):
      found.append((op, float(src.scale[0]), float(dst.scale[0])))
  return found


def tflite_to_tf_arrays(graph: flatbuffer.Graph, model_config: ml_collections.ConfigDict,
                        match_runtime: bool = False) -> Tuple[Dict[str, np.ndarray], dict]:
  """Maps the graph's folded conv layers onto official TF variable names (BN in identity form).

  Args:
    graph: the parsed TFLite model.
    model_config: `config.model` (MobileNetV2, image pooling + 1x1 ASPP branch, no decoder).
    match_runtime: reproduce the official uint8 runtime instead of the graph's meaning where they differ:
      a requantizing RESIZE_BILINEAR of the image-pooling branch (see `_requantizing_resizes`) scales that
      branch by `s_out / s_in` in the runtime; with True that factor is folded into `image_pooling`'s BN
      gamma and beta (exact, as ReLU commutes with a positive scale).

  Returns:
    `({TF name: array}, info)`; info has 'output_stride', 'input_size', 'quantized', 'input_quantization'
    and 'notes' (every way the graph's semantics differ from our float model).

  Raises:
    ConversionError: naming the layers whose kind, shape, stride, rate, padding or activation disagree.
  """
  _check_model_config(model_config)
  view = _GraphView(graph)
  unsupported = sorted({op.op for op in graph.operators} - _SUPPORTED_OPS)
  if unsupported:
    raise ConversionError(f'The TFLite graph has ops outside the DeepLab MobileNetV2 graph: {unsupported}.')
  convs = [op for op in graph.operators if op.op in ('CONV_2D', 'DEPTHWISE_CONV_2D')]
  image = graph.tensors[convs[0].inputs[0]]
  pools = [op for op in graph.operators if op.op in ('AVERAGE_POOL_2D', 'MEAN')]
  concats = [op for op in graph.operators if op.op == 'CONCATENATION']
  if len(pools) != 1 or len(concats) != 1:
    raise ConversionError(f'Expected one image-pooling op and one CONCATENATION; found {len(pools)} and '
                          f'{len(concats)}: not a DeepLab MobileNetV2 graph.')
  pool, concat = pools[0], concats[0]
  features = graph.tensors[pool.inputs[0]]
  input_size, feature_size = image.shape[1], features.shape[1]
  output_stride = (input_size - 1) // (feature_size - 1) if feature_size > 1 else None
  if output_stride not in (8, 16, 32):
    raise ConversionError(f'Cannot tell the output stride: input {image.shape}, features {features.shape}.')
  layers = _our_layers(model_config, output_stride)

  # Head convs by structure; backbone convs are the rest, in execution order.
  pool_conv = next((c for c in view.consumers.get(pool.outputs[0], []) if c.op == 'CONV_2D'), None)
  projection = next((c for c in view.consumers.get(concat.outputs[0], []) if c.op == 'CONV_2D'), None)
  branch_convs = [view.source_conv(t) for t in concat.inputs]
  if pool_conv is None or projection is None or None in branch_convs or len(branch_convs) != 2:
    raise ConversionError('The TFLite head is not image pooling + one 1x1 branch -> concat -> projection.')
  aspp0 = next(c for c in branch_convs if c is not pool_conv)
  logits = convs[-1]
  head_ops = {'image_pooling': pool_conv, 'aspp0': aspp0, 'concat_projection': projection,
              'logits/semantic': logits}
  head_ids = {op.index for op in head_ops.values()}
  backbone_ops = [op for op in convs if op.index not in head_ids]
  backbone_layers = [l for l in layers if l.scope not in _HEAD]
  if len(backbone_ops) != len(backbone_layers) or len(head_ids) != 4:
    raise ConversionError(
        f'The TFLite backbone has {len(backbone_ops)} conv layers; MobileNetV2 at depth multiplier '
        f'{model_config.depth_multiplier} has {len(backbone_layers)} (wrong --config for this model?).')
  pairs = list(zip(backbone_layers, backbone_ops)) + [
      (next(l for l in layers if l.scope == s), head_ops[s]) for s in _HEAD]

  eps_backbone = common.bn_epsilon(model_config, 'MobilenetV2/Conv')
  eps_head = common.bn_epsilon(model_config, 'aspp0')
  arrays, problems = {}, []
  for layer, op in pairs:
    kind = 'DEPTHWISE_CONV_2D' if layer.depthwise else 'CONV_2D'
    opts = op.options
    found = (op.op, opts['stride'][0], opts['dilation'][0], opts['padding'], _activation(graph, op))
    expected = (kind, layer.stride, layer.rate, 'SAME', layer.activation)
    if found != expected:
      problems.append(f'{layer.scope} (op {op.index}): graph (op, stride, rate, padding, activation) '
                      f'{found}, ours {expected}')
      continue
    # TFLite kernels are [O, kh, kw, I] (depthwise [1, kh, kw, C]); TF's are [kh, kw, I, O] / [kh, kw, C, 1].
    kernel = np.transpose(view.constant(op.inputs[1]), (1, 2, 3, 0))
    bias = (view.constant(op.inputs[2]) if len(op.inputs) > 2 and op.inputs[2] >= 0
            else np.zeros((kernel.shape[-1] if not layer.depthwise else kernel.shape[2],), np.float32))
    if op is projection and branch_convs[0] is not pool_conv:
      # Our concat is [image_pooling, aspp0]: swap the two input-channel blocks to match.
      half = kernel.shape[2] // 2
      kernel = np.concatenate([kernel[:, :, half:], kernel[:, :, :half]], axis=2)
    arrays[f"{layer.scope}/{'depthwise_weights' if layer.depthwise else 'weights'}"] = kernel
    if layer.scope == 'logits/semantic':
      arrays['logits/semantic/biases'] = bias
      continue
    eps = eps_backbone if layer.scope.startswith('MobilenetV2/') else eps_head
    arrays[f'{layer.scope}/BatchNorm/gamma'] = np.ones_like(bias)
    arrays[f'{layer.scope}/BatchNorm/beta'] = bias
    arrays[f'{layer.scope}/BatchNorm/moving_mean'] = np.zeros_like(bias)
    arrays[f'{layer.scope}/BatchNorm/moving_variance'] = np.full_like(bias, 1.0 - eps)
  if problems:
    raise ConversionError(f'{len(problems)} TFLite layers disagree with our MobileNetV2 at output stride '
                          f'{output_stride}:\n  ' + '\n  '.join(problems))
  info = _describe(graph, view, pool, concat, branch_convs[0] is pool_conv, output_stride, image, features,
                   [l.scope for l, op in pairs
                    if op.op == 'CONV_2D' and _activation(graph, op) != op.options['activation']])
  for op, s_in, s_out in _requantizing_resizes(graph):
    branch = 'image_pooling' if view.source_conv(op.inputs[0]) is pool_conv else None
    src, dst = graph.tensors[op.inputs[0]].shape, graph.tensors[op.outputs[0]].shape
    info['notes'].append(
        f'uint8 RESIZE_BILINEAR {src[1]}x{src[2]} -> {dst[1]}x{dst[2]} ({branch or "op " + str(op.index)}) '
        f'has input scale {s_in:.6g} but output scale {s_out:.6g}: the runtime copies the uint8 codes, so it '
        f'scales that branch by {s_out / s_in:.4f}; the graph (and the TF model) mean a plain resize, as '
        'ours. '
        + ('Reproduced here (match_runtime): folded into image_pooling BN gamma/beta.' if match_runtime
           else 'Convert with --match_tflite_runtime to reproduce the runtime.'))
    if match_runtime:
      zero_points = (graph.tensors[op.inputs[0]].zero_point[0], graph.tensors[op.outputs[0]].zero_point[0])
      if branch != 'image_pooling' or zero_points != (0, 0):
        raise ConversionError(f'match_runtime: cannot reproduce the requantizing resize op {op.index} '
                              f'(branch {branch}, zero points {zero_points}) as a scale of image_pooling.')
      for leaf in ('gamma', 'beta'):
        arrays[f'image_pooling/BatchNorm/{leaf}'] = arrays[f'image_pooling/BatchNorm/{leaf}'] * (s_out / s_in)
  info['match_runtime'] = bool(match_runtime)
  return arrays, info


def _describe(graph, view, pool, concat, concat_order_ok, output_stride, image, features, implied_relu):
  """What the graph does, and every way it differs from our float model."""
  notes = []
  quantized = image.dtype == np.uint8
  if quantized:
    scale, zero = float(image.scale[0]), int(image.zero_point[0])
    notes.append(f'uint8 input: real = (pixel - {zero}) * {scale:g}, i.e. pixel/{1 / scale:g} - '
                 f'{zero * scale:g}; our model uses pixel*2/255 - 1 (the official float preprocessing): '
                 f'{abs(1 / scale - 127.5) / 127.5 * 100:.2f}% input scale difference.')
    notes.append('quantized weights dequantized to float32; our model runs in float (no uint8 clamping '
                 'of activations, no requantization between layers).')
  if implied_relu:
    notes.append(f'{len(implied_relu)} convs store activation NONE with a uint8 output range starting '
                 f'at 0 (implied ReLU, clamped at the range top): {", ".join(implied_relu)}; ours apply '
                 'ReLU explicitly with no upper clamp.')
  opts = pool.options
  if pool.op == 'AVERAGE_POOL_2D':
    window = opts['window']
    whole = tuple(window) == tuple(features.shape[1:3])
    notes.append(f'image pooling: AVERAGE_POOL_2D window {window[0]}x{window[1]} padding {opts["padding"]} '
                 f'on {features.shape[1]}x{features.shape[2]} features (' + (
                     'the whole map, identical to our global mean at this input size' if whole else
                     'NOT the whole map: our model averages the whole map') + ').')
  else:
    notes.append('image pooling: MEAN over the feature map (same as ours).')
  for op in graph.operators:
    if op.op == 'RESIZE_BILINEAR':
      src = graph.tensors[op.inputs[0]].shape
      dst = graph.tensors[op.outputs[0]].shape
      o = op.options
      if src[1:3] != dst[1:3] and not (src[1] == 1 and src[2] == 1):
        same = o['align_corners'] and not o['half_pixel_centers']
        notes.append(f'RESIZE_BILINEAR {src[1]}x{src[2]} -> {dst[1]}x{dst[2]}: align_corners='
                     f'{o["align_corners"]}, half_pixel_centers={o["half_pixel_centers"]} ('
                     + ('same as ours' if same else 'DIFFERS from our align_corners=True') + ').')
  if not concat_order_ok:
    notes.append('concat order is [aspp0, image_pooling]; concat_projection input channels reordered.')
  outputs = [graph.tensors[i] for i in graph.outputs]
  if any(op.op == 'ARG_MAX' for op in graph.operators):
    notes.append(f'the graph ends in ARG_MAX ({outputs[0].shape}); ours returns logits.')
  return {
      'output_stride': output_stride,
      'input_size': image.shape[1],
      'quantized': quantized,
      'input_quantization': ((float(image.scale[0]), int(image.zero_point[0])) if quantized else None),
      'input_dtype': np.dtype(image.dtype).name,
      'notes': notes,
  }


def convert_tflite(path: str, config: ml_collections.ConfigDict, scope: str = 'all',
                   match_runtime: bool = False) -> Tuple[dict, dict]:
  """Reads an official DeepLab MobileNetV2 `.tflite` and returns `(variables, report)` for `config.model`.

  The report adds 'format', 'output_stride' (the graph's; parameters do not depend on it) and 'notes'.
  `match_runtime`: see `tflite_to_tf_arrays`.
  """
  graph = flatbuffer.read_tflite(path)
  arrays, info = tflite_to_tf_arrays(graph, config.model, match_runtime)
  variables, report = common.assign(arrays, config.model, scope)
  report.update(format='tflite', **info)
  return variables, report
