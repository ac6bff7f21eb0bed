"""Export: the inference function with its weights as one `jax.export` artefact a server runs with jax alone.

    python -m deeplab_jax.export --checkpoint=DIR --output=model.jax [--batch=dynamic|N]
        [--height=513|dynamic] [--width=513|dynamic] [--outputs=labels,probabilities,logits]
        [--input_dtype=uint8|float32] [--[no]sizes_input] [--platforms=cpu,cuda] [--saved_model=DIR]

writes `model.jax` (`Exported.serialize()`: StableHLO with the weights embedded as constants, lowered for
every platform in `--platforms`) and `model.jax.json` (inputs, outputs, class names, the protocol). A
process with only `jax` and `numpy` installed runs it:

    exported = jax.export.deserialize(open('model.jax', 'rb').read())
    outputs = exported.call(images, sizes)  # uint8 [B, 513, 513, 3], int32 [B, 2] -> {'labels': ...}

The function is `--mode=eval`'s: each image is padded top-left with the mean pixel to the eval crop
(`config.eval.crop_size`, or the input size where that is larger), `evaluate.predict_probabilities` runs
with the checkpoint's eval scales / flip / output stride (or the flags'), and the outputs are cropped back
to the input size. Outputs: 'labels' (int32 argmax), 'probabilities' (float32, averaged over scales and
flips), 'logits' (float32, one pass at scale 1.0, resized to the input: the model's own output).

Shapes. The batch is symbolic by default (`--batch=dynamic`: any batch size; each new size compiles once on
the server). Height and width are fixed by default, to the eval crop, and the function takes a second
input `sizes` (int32 `[B, 2]`, each image's height and width): the server puts each image at the top-left
of its row and the function replaces the rest by the mean pixel, exactly as eval pads (127.5, which uint8
cannot hold); results are valid in the top-left `sizes[i]` of each output. One compiled shape per batch
size serves images of every size up to the crop. `--nosizes_input` drops `sizes` (every row is a whole
image). `--height=dynamic --width=dynamic` exports symbolic spatial dimensions instead and no `sizes`: any
size up to the eval crop, padded inside the function (a larger one fails at call time with a shape error);
the price is one compilation per distinct input shape on the server. Sizes above the crop need a fixed
`--height/--width` at least that big.

With `depthwise_impl='auto'` the artefact carries both depthwise implementations and picks per platform at
run time (`lax.platform_dependent`): shifted multiply-adds on CPU, grouped convolutions elsewhere.

`--saved_model=DIR` also writes a TensorFlow SavedModel of the same function via `jax2tf` (needs
TensorFlow; the serving signature takes `images` (and `sizes`) and returns the chosen outputs).
"""
import json
import os
from typing import Any, Optional, Sequence, Union

from absl import app
from absl import flags
import jax
from jax import export as jax_export
import jax.numpy as jnp
import ml_collections
import numpy as np

from deeplab_jax import datasets
from deeplab_jax import evaluate
from deeplab_jax import predict
from deeplab_jax.models import create_model
from deeplab_jax.models import mean_pixel

PyTree = Any
Dim = Union[int, str]  # a size, or 'dynamic'
OUTPUTS = ('labels', 'probabilities', 'logits')
INPUT_DTYPES = {'uint8': jnp.uint8, 'float32': jnp.float32}
DYNAMIC = 'dynamic'


def _parse_dim(value: Union[int, str, None], name: str) -> Optional[Dim]:
  if value is None or value == '':
    return None
  if str(value).lower() == DYNAMIC:
    return DYNAMIC
  try:
    size = int(value)
  except ValueError:
    size = 0
  if size < 1:
    raise ValueError(f'--{name}={value!r}: expected a positive integer or {DYNAMIC!r}.')
  return size


def inference_function(config: ml_collections.ConfigDict, variables: PyTree, *, canvas_size: Sequence[int],
                       outputs: Sequence[str] = ('labels',), with_sizes: bool = False,
                       output_stride: Optional[int] = None, scales: Optional[Sequence[float]] = None,
                       flip: Optional[bool] = None):
  """`fn(images [B, h, w, 3][, sizes [B, 2]]) -> {output name: array}` with the weights captured as constants.

  Args:
    config: the checkpoint's config.
    variables: `{'params', 'batch_stats'}` (numpy or jax arrays).
    canvas_size: `(H, W)` the images are padded to (mean pixel, top-left); h <= H and w <= W.
    outputs: names from `OUTPUTS`.
    with_sizes: `fn` also takes `sizes`, int32 `[B, 2]` (height, width) of each image at the top-left of
      its row of `images`; pixels beyond are replaced by the mean pixel, as eval pads. So a batch of
      uint8 images of different sizes gives eval's results (uint8 cannot hold the mean pixel 127.5).
    output_stride, scales, flip: eval protocol; defaults from `config.eval`.

  Returns:
    The function; labels `[B, h, w]` int32, probabilities and logits `[B, h, w, K]` float32 (with `sizes`,
    only the top-left `sizes[i]` of row i is the image's result).
  """
  unknown = sorted(set(outputs) - set(OUTPUTS))
  if unknown or not outputs:
    raise ValueError(f'--outputs={",".join(outputs)}: choose one or more of {", ".join(OUTPUTS)}.')
  output_stride, scales, flip = predict.eval_protocol(config, output_stride, scales, flip)
  model = create_model(config.model, output_stride=output_stride)
  pad_value = np.asarray(mean_pixel(config.model), np.float32)
  variables = jax.tree.map(np.asarray, variables)
  canvas_h, canvas_w = int(canvas_size[0]), int(canvas_size[1])

  def compute(model, variables, canvas):
    results = {}
    if 'labels' in outputs or 'probabilities' in outputs:
      probabilities = evaluate.predict_probabilities(model, variables, canvas, scales, flip)
      results['probabilities'] = probabilities
      results['labels'] = jnp.argmax(probabilities, axis=-1).astype(jnp.int32)
    if 'logits' in outputs:
      results['logits'] = model.apply(variables, canvas, train=False)
    return results

  def fn(images, sizes=None):
    batch, height, width = images.shape[0], images.shape[1], images.shape[2]
    pixels = images.astype(jnp.float32)
    if sizes is not None:
      rows = jax.lax.broadcasted_iota(jnp.int32, (1, height, 1, 1), 1)
      cols = jax.lax.broadcasted_iota(jnp.int32, (1, 1, width, 1), 2)
      sizes = sizes.astype(jnp.int32)
      inside = (rows < sizes[:, 0, None, None, None]) & (cols < sizes[:, 1, None, None, None])
      pixels = jnp.where(inside, pixels, jnp.asarray(pad_value))
    canvas = jnp.broadcast_to(jnp.asarray(pad_value), (batch, canvas_h, canvas_w, 3))
    # The update's shape may be symbolic; the canvas's is not, so the model sees static shapes.
    canvas = jax.lax.dynamic_update_slice(canvas, pixels, (0, 0, 0, 0))
    weights = jax.tree.map(jnp.asarray, variables)  # one set of constants, shared by both branches below
    if model.depthwise_impl == 'auto':
      results = jax.lax.platform_dependent(
          weights, canvas,
          cpu=lambda w, x: compute(model.clone(depthwise_impl='shifted'), w, x),
          default=lambda w, x: compute(model.clone(depthwise_impl='grouped'), w, x))
    else:
      results = compute(model, weights, canvas)
    return {name: results[name][:, :height, :width] for name in outputs}

  if with_sizes:
    return fn
  return lambda images: fn(images)


def input_specs(batch: Dim, height: Dim, width: Dim, dtype: str, max_size: Sequence[int],
                with_sizes: bool) -> tuple[jax.ShapeDtypeStruct, ...]:
  """Specs of `images` `[batch, height, width, 3]` (and `sizes` `[batch, 2]` int32); 'dynamic' is symbolic.

  Symbolic `h` and `w` are declared at most `max_size` (the canvas the images are padded to).
  """
  names = {'b': batch, 'h': height, 'w': width}
  dims = [name if value == DYNAMIC else str(int(value)) for name, value in names.items()]
  if any(value == DYNAMIC for value in names.values()):
    constraints = [f'{name} <= {int(limit)}' for name, limit in zip('hw', max_size) if names[name] == DYNAMIC]
    shape = jax_export.symbolic_shape(', '.join(dims + ['3']), constraints=constraints)
  else:
    shape = tuple(int(d) for d in dims) + (3,)
  specs = (jax.ShapeDtypeStruct(shape, INPUT_DTYPES[dtype]),)
  if with_sizes:
    specs += (jax.ShapeDtypeStruct((shape[0], 2), jnp.int32),)  # the same (possibly symbolic) batch
  return specs


def export_model(config: ml_collections.ConfigDict, variables: PyTree, *, batch: Dim = DYNAMIC,
                 height: Optional[Dim] = None, width: Optional[Dim] = None,
                 outputs: Sequence[str] = ('labels',),
                 input_dtype: str = 'uint8', sizes_input: Optional[bool] = None,
                 platforms: Sequence[str] = ('cpu', 'cuda'), output_stride: Optional[int] = None,
                 scales: Optional[Sequence[float]] = None,
                 flip: Optional[bool] = None) -> tuple[jax_export.Exported, dict]:
  """Exports the inference function; see the module docstring.

  Args:
    config, variables: the checkpoint's.
    batch: batch size or 'dynamic'.
    height, width: input size, 'dynamic' (up to the eval crop), or None for the eval crop.
    outputs: names from `OUTPUTS`.
    input_dtype: 'uint8' or 'float32' RGB in [0, 255].
    sizes_input: the function also takes `sizes` (see `inference_function`); default: unless both
      spatial dimensions are dynamic (then the shape gives the size).
    platforms: lowering platforms ('cpu', 'cuda', 'rocm', 'tpu').
    output_stride, scales, flip: eval protocol; defaults from `config.eval`.

  Returns:
    `(exported, metadata)`; metadata is what `save` writes next to the artefact.
  """
  if input_dtype not in INPUT_DTYPES:
    raise ValueError(f'--input_dtype={input_dtype!r} is not one of {tuple(INPUT_DTYPES)}.')
  batch = _parse_dim(batch, 'batch') or DYNAMIC
  crop = tuple(int(c) for c in config.eval.crop_size)
  height = _parse_dim(height, 'height') or crop[0]
  width = _parse_dim(width, 'width') or crop[1]
  if sizes_input is None:
    sizes_input = not (height == DYNAMIC and width == DYNAMIC)
  canvas = tuple(c if d == DYNAMIC else max(c, d) for c, d in zip(crop, (height, width)))
  output_stride, scales, flip = predict.eval_protocol(config, output_stride, scales, flip)
  fn = inference_function(config, variables, canvas_size=canvas, outputs=outputs, with_sizes=sizes_input,
                          output_stride=output_stride, scales=scales, flip=flip)
  specs = input_specs(batch, height, width, input_dtype, canvas, sizes_input)
  exported = jax_export.export(jax.jit(fn), platforms=tuple(platforms))(*specs)
  max_size = [canvas[0] if height == DYNAMIC else height, canvas[1] if width == DYNAMIC else width]
  inputs = {'images': {'shape': [batch, height, width, 3], 'dtype': input_dtype, 'max_size': max_size,
                       'layout': 'RGB pixels in [0, 255], [batch, height, width, 3]'}}
  if sizes_input:
    inputs['sizes'] = {'shape': [batch, 2], 'dtype': 'int32',
                       'layout': "(height, width) of each image at the top-left of its row of 'images'; "
                                 'pixels beyond are ignored (replaced by pad_value)'}
  metadata = {
      'inputs': inputs,
      'outputs': {name: {'labels': 'int32 [batch, height, width] class indices',
                         'probabilities': 'float32 [batch, height, width, classes]',
                         'logits': 'float32 [batch, height, width, classes] (one pass at scale 1.0)'}[name]
                  for name in outputs},
      'padded_to': list(canvas), 'pad_value': list(mean_pixel(config.model)),
      'output_stride': output_stride, 'scales': list(scales), 'flip': flip,
      'platforms': list(exported.platforms), 'dataset': config.dataset.name,
      'class_names': list(datasets.class_names(config.dataset)),
      'jax_version': jax.__version__,
      'calling_convention_version': exported.calling_convention_version,
  }
  return exported, metadata


def save(exported: jax_export.Exported, metadata: dict, path: str) -> tuple[str, str]:
  """Writes the artefact to `path` and its metadata to `path + '.json'`; returns both paths."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with open(path, 'wb') as f:
    f.write(exported.serialize())
  with open(path + '.json', 'w') as f:
    json.dump(metadata, f, indent=1)
  return path, path + '.json'


def load(path: str) -> jax_export.Exported:
  """The artefact at `path` (what a server does, with `jax.export.deserialize` alone)."""
  with open(path, 'rb') as f:
    return jax_export.deserialize(bytearray(f.read()))


def save_tf_saved_model(config: ml_collections.ConfigDict, variables: PyTree, directory: str, *,
                        metadata: dict, platforms: Sequence[str] = ('cpu', 'cuda'), **protocol) -> str:
  """Writes a TensorFlow SavedModel of the same function via `jax2tf` (native serialization).

  Args:
    config, variables: the checkpoint's.
    directory: the SavedModel folder.
    metadata: `export_model`'s metadata (shapes, dtype, sizes input, outputs).
    platforms: lowering platforms.
    **protocol: output_stride, scales, flip.

  Raises:
    ImportError: TensorFlow is not installed (`pip install 'deeplab_jax[tf]'`).
  """
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('--saved_model needs TensorFlow: pip install "deeplab_jax[tf]".') from e
  images = metadata['inputs']['images']
  batch, height, width, _ = images['shape']
  with_sizes = 'sizes' in metadata['inputs']
  fn = inference_function(config, variables, canvas_size=metadata['padded_to'],
                          outputs=tuple(metadata['outputs']), with_sizes=with_sizes, **protocol)
  b = 'b' if batch == DYNAMIC else str(batch)
  polymorphic = [f'({b}, {"h" if height == DYNAMIC else height}, {"w" if width == DYNAMIC else width}, 3)']
  tf_dtype = {'uint8': tf.uint8, 'float32': tf.float32}[images['dtype']]
  batch_dim = None if batch == DYNAMIC else int(batch)
  signature = [tf.TensorSpec([batch_dim] + [None if d == DYNAMIC else int(d) for d in (height, width)] + [3],
                             tf_dtype, name='images')]
  if with_sizes:
    polymorphic.append(f'({b}, 2)')
    signature.append(tf.TensorSpec([batch_dim, 2], tf.int32, name='sizes'))
  converted = jax2tf.convert(fn, polymorphic_shapes=polymorphic, with_gradient=False,
                             native_serialization_platforms=tuple(platforms))
  module = tf.Module()
  module.serve = tf.function(converted, autograph=False, input_signature=signature)
  tf.saved_model.save(module, directory, signatures={'serving_default': module.serve})
  return directory


def main(argv: Sequence[str]) -> None:
  """`python -m deeplab_jax.export`: see the module docstring and `--help`."""
  del argv
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  predict.quiet_checkpoint_logs(FLAGS)
  protocol = predict.protocol_from_flags(FLAGS)
  variables, config, step = predict.load_checkpoint(FLAGS.checkpoint, FLAGS.step)
  exported, metadata = export_model(config, variables, batch=FLAGS.batch, height=FLAGS.height,
                                    width=FLAGS.width, outputs=FLAGS.outputs, input_dtype=FLAGS.input_dtype,
                                    sizes_input=FLAGS.sizes_input, platforms=FLAGS.platforms, **protocol)
  metadata['checkpoint'] = {'path': os.path.abspath(FLAGS.checkpoint), 'step': step}
  path, metadata_path = save(exported, metadata, FLAGS.output)
  inputs = ', '.join(f'{name} {spec["dtype"]} {spec["shape"]}' for name, spec in metadata['inputs'].items())
  print(f'Exported step {step} of {FLAGS.checkpoint} to {path} ({os.path.getsize(path) / 2**20:.1f} MiB; '
        f'metadata {metadata_path}): inputs {inputs}; outputs {", ".join(metadata["outputs"])}; platforms '
        f'{", ".join(metadata["platforms"])}.')
  if FLAGS.saved_model:
    directory = save_tf_saved_model(config, variables, FLAGS.saved_model, metadata=metadata,
                                    platforms=FLAGS.platforms, **protocol)
    print(f'SavedModel written to {directory} (signature serving_default: {", ".join(metadata["inputs"])} -> '
          f'{", ".join(metadata["outputs"])}).')


def _define_flags() -> None:
  """Command-line flags: defined only when run as a program, so importing this module defines none."""
  predict.define_checkpoint_and_protocol_flags()
  flags.adopt_module_key_flags(predict)  # listed by --help with this program's own flags
  flags.DEFINE_string('output', None, 'Artefact path, e.g. model.jax (metadata goes to <output>.json).',
                      required=True)
  flags.DEFINE_string('batch', DYNAMIC, f'Batch size, or {DYNAMIC!r} for a symbolic batch.')
  flags.DEFINE_string('height', None, f'Input height (default: the eval crop), or {DYNAMIC!r} (up to the '
                      'crop).')
  flags.DEFINE_string('width', None, f'Input width (default: the eval crop), or {DYNAMIC!r} (up to the '
                      'crop).')
  flags.DEFINE_list('outputs', ['labels'], f'Any of {", ".join(OUTPUTS)}.')
  flags.DEFINE_enum('input_dtype', 'uint8', list(INPUT_DTYPES),
                    'Input pixels: uint8 or float32, RGB in [0, 255].')
  flags.DEFINE_bool('sizes_input', None, 'Also take sizes [batch, 2] (each image\'s height, width at the '
                    'top-left of its row): exact eval padding for images smaller than the input. Default: on '
                    'unless height and width are both dynamic.')
  flags.DEFINE_list('platforms', ['cpu', 'cuda'], 'Platforms to lower for (cpu, cuda, rocm, tpu).')
  flags.DEFINE_string('saved_model', None, 'Also write a TensorFlow SavedModel to this folder (needs '
                      'TensorFlow).')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
