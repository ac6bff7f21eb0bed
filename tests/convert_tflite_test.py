"""The TFLite importer against the official runtime (`ai-edge-litert`) on the released DeepLab models.

The float model (`deeplabv3_257_mv_gpu.tflite`, MobileNetV2 x0.5) converted must give the runtime's logits on
real images (the bird and 20 VOC images at 257x257): argmax agreement >= 99.9%, max abs logit difference
<= 1e-2. The two uint8 quantization-aware models, converted and run as float at 513x513, must pass the
published test of these files (bird IoU > 0.9) and agree with the runtime's integer argmax on most pixels.
"""
import numpy as np
import pytest
from PIL import Image

import jax
from ai_edge_litert.interpreter import Interpreter
from ai_edge_litert.interpreter import OpResolverType
from configs import voc_mobilenetv2
from deeplab_jax.convert import common
from deeplab_jax.convert import flatbuffer
from deeplab_jax.convert import tflite
from deeplab_jax.models import create_model

FLOAT_MODEL = 'deeplabv3_257_mv_gpu.tflite'
QUANT_MODELS = {'deeplabv3_mnv2_pascal_quant.tflite': '1.0',
                'deeplabv3_mnv2_dm05_pascal_quant.tflite': '0.5'}


def official_interpreter(path) -> Interpreter:
  interpreter = Interpreter(
      model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
  interpreter.allocate_tensors()
  return interpreter


def run_official(interpreter: Interpreter, image: np.ndarray) -> np.ndarray:
  interpreter.set_tensor(interpreter.get_input_details()[0]['index'], image[None])
  interpreter.invoke()
  return interpreter.get_tensor(interpreter.get_output_details()[0]['index'])[0]


def published_iou(prediction: np.ndarray, expected: np.ndarray) -> float:
  """The published test's IoU of two label maps: equal pixels / (|a| + |b| - equal pixels)."""
  equal = int(np.sum(prediction == expected))
  return equal / (prediction.size + expected.size - equal)


def images_257(shared_data, count=20) -> np.ndarray:
  """The bird and the first `count` VOC images, resized to the float model's 257x257, uint8."""
  paths = [shared_data / 'official_tflite' / 'bird.bmp']
  voc = shared_data / 'voc2012_train_subset'
  ids = sorted((voc / 'ImageSets' / 'Segmentation' / 'train.txt').read_text().split())[:count]
  paths += [voc / 'JPEGImages' / f'{i}.jpg' for i in ids]
  return np.stack([np.asarray(Image.open(p).convert('RGB').resize((257, 257), Image.BILINEAR))
                   for p in paths])


def test_reader_matches_runtime_tensors(shared_data):
  path = shared_data / 'official_tflite' / 'deeplabv3_mnv2_pascal_quant.tflite'
  graph = flatbuffer.read_tflite(str(path))
  interpreter = official_interpreter(path)
  details = {d['index']: d for d in interpreter.get_tensor_details()}
  constants = [t for t in graph.tensors if t.data is not None and t.data.ndim > 0]
  assert len(constants) == 113  # 55 convs x (kernel, bias) + 3 resize sizes
  for tensor in constants:
    np.testing.assert_array_equal(tensor.data, interpreter.get_tensor(tensor.index))
    assert details[tensor.index]['name'] == tensor.name
    np.testing.assert_allclose(details[tensor.index]['quantization_parameters']['scales'], tensor.scale)
  ops = interpreter._get_ops_details()  # pylint: disable=protected-access
  assert [o.op for o in graph.operators] == [o['op_name'] for o in ops]


def test_float_model_matches_official_runtime(shared_data):
  path = shared_data / 'official_tflite' / FLOAT_MODEL
  config = voc_mobilenetv2.get_config('0.5')
  variables, report = tflite.convert_tflite(str(path), config)
  assert len(report['loaded']) == 272 and report['new'] == [] and report['skipped'] == []
  assert report['output_stride'] == 8 and not report['quantized']  # exported at OS8 (33x33 features)
  model = create_model(config.model, output_stride=report['output_stride'])
  images = images_257(shared_data)
  interpreter = Interpreter(model_path=str(path))
  interpreter.allocate_tensors()
  theirs = np.stack([run_official(interpreter, image.astype(np.float32) / 127.5 - 1.0) for image in images])
  # The TFLite input is x/127.5 - 1; ours takes raw pixels and normalises them the same way.
  ours = np.asarray(jax.jit(model.apply)(variables, images.astype(np.float32)))
  assert ours.shape == theirs.shape == (21, 257, 257, 21)
  agreement = np.mean(ours.argmax(-1) == theirs.argmax(-1))
  max_diff = np.max(np.abs(ours - theirs))
  assert agreement >= 0.999, agreement
  assert max_diff <= 1e-2, max_diff
  assert len(np.unique(theirs.argmax(-1))) > 3  # real images, several classes: not a trivial match


def bird_class_iou(prediction: np.ndarray, expected: np.ndarray, bird: int = 3) -> float:
  return np.sum((prediction == bird) & (expected == bird)) / np.sum((prediction == bird) | (expected == bird))


@pytest.mark.parametrize('match_runtime', [False, True])
@pytest.mark.parametrize('name', sorted(QUANT_MODELS))
def test_quantized_model_as_float_segments_the_bird(name, match_runtime, shared_data):
  folder = shared_data / 'official_tflite'
  config = voc_mobilenetv2.get_config(QUANT_MODELS[name])
  variables, report = tflite.convert_tflite(str(folder / name), config, match_runtime=match_runtime)
  assert report['quantized'] and report['output_stride'] == 16
  assert report['input_quantization'] == (0.0078125, 128)
  image = np.asarray(Image.open(folder / 'bird_segmentation.bmp').convert('RGB'))
  expected = np.asarray(Image.open(folder / 'bird_segmentation_mask.bmp'))[..., 0]
  model = create_model(config.model, output_stride=report['output_stride'])
  ours = np.asarray(jax.jit(model.apply)(variables, image[None].astype(np.float32)))[0].argmax(-1)
  theirs = run_official(official_interpreter(folder / name), image)
  assert published_iou(ours, expected) > 0.9
  assert published_iou(theirs, expected) > 0.9
  if match_runtime:
    # With the runtime's image-pooling resize reproduced, only uint8 rounding separates the two.
    assert np.mean(ours == theirs) > 0.995
    assert bird_class_iou(ours, expected) > 0.9
  else:
    assert np.mean(ours == theirs) > 0.98  # the graph's meaning vs the runtime's resize and uint8 math


def test_quantized_graph_semantics_are_reported(shared_data):
  path = shared_data / 'official_tflite' / 'deeplabv3_mnv2_dm05_pascal_quant.tflite'
  variables, report = tflite.convert_tflite(str(path), voc_mobilenetv2.get_config('0.5'))
  notes = '\n'.join(report['notes'])
  assert 'implied ReLU' in notes and 'image_pooling, aspp0, concat_projection' in notes
  assert 'AVERAGE_POOL_2D window 33x33 padding VALID on 33x33 features (the whole map' in notes
  assert 'RESIZE_BILINEAR 33x33 -> 513x513: align_corners=True, half_pixel_centers=False (same' in notes
  assert 'ARG_MAX' in notes
  # dm0.5: the image-pooling resize reads codes of scale 0.0123 as scale 0.0291 in the runtime (x2.36).
  assert ('uint8 RESIZE_BILINEAR 1x1 -> 33x33 (image_pooling) has input scale 0.0122984 but output scale '
          '0.029083: the runtime copies the uint8 codes, so it scales that branch by 2.3648') in notes
  # Folded BN is our BN with identity statistics: gamma 1, mean 0, var 1 - eps, beta = folded bias.
  bn = variables['params']['MobilenetV2']['expanded_conv_3']['depthwise/BatchNorm']
  stats = variables['batch_stats']['MobilenetV2']['expanded_conv_3']['depthwise/BatchNorm']
  np.testing.assert_array_equal(bn['scale'], 1.0)
  np.testing.assert_array_equal(stats['mean'], 0.0)
  np.testing.assert_allclose(stats['var'], 1.0 - 1e-3)
  head = variables['batch_stats']['aspp']['aspp0/BatchNorm']['var']
  np.testing.assert_allclose(head, 1.0 - 1e-5)
  assert np.any(bn['bias'] != 0)
  print(common.format_report(report))


@pytest.mark.parametrize('depth,backbone,pattern', [
    ('1.0', 'mobilenet_v2', r'MobilenetV2/Conv/weights: checkpoint \(3, 3, 3, 16\) -> ours '
                            r'MobilenetV2/Conv/kernel \(3, 3, 3, 32\)'),
    ('0.5', 'xception_65', r'backbone=.xception_65. \(needs mobilenet_v2\)'),
])
def test_wrong_config_lists_mismatches(depth, backbone, pattern, shared_data):
  config = voc_mobilenetv2.get_config(depth)
  config.model.backbone = backbone
  with pytest.raises(common.ConversionError, match=pattern):
    tflite.convert_tflite(str(shared_data / 'official_tflite' / FLOAT_MODEL), config)
