"""The PyTorch backbone importer on state dicts written in timm's and torchvision's layouts.

The state dicts are built here from the architectures' own definitions (timm `xception_aligned.py`,
torchvision `resnet.py` / `mobilenetv2.py`: key names, OIHW shapes, BN buffers), filled with random values
and written as safetensors. Every key must be consumed or reported skipped, and the first conv + BN of each
converted backbone must compute what PyTorch computes on the same raw pixels (the input normalisation and
BN epsilon conversions included).
"""
import importlib.util
import json
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import default
from configs import voc_mobilenetv2
from deeplab_jax import checkpoint
from deeplab_jax.convert import common
from deeplab_jax.convert import pytorch
from deeplab_jax.models import create_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StateDict:
  """Builds a PyTorch-style state dict with random weights and valid BN statistics."""

  def __init__(self, seed=0):
    self.rng = np.random.default_rng(seed)
    self.state = {}

  def conv(self, key, out_ch, in_ch, k, bias=False):
    fan_in = in_ch * k * k
    self.state[f'{key}.weight'] = (self.rng.standard_normal((out_ch, in_ch, k, k), np.float32)
                                   / np.sqrt(fan_in)).astype(np.float32)
    if bias:
      self.state[f'{key}.bias'] = self.rng.standard_normal((out_ch,), np.float32)

  def bn(self, key, channels):
    self.state[f'{key}.weight'] = self.rng.uniform(0.5, 1.5, channels).astype(np.float32)
    self.state[f'{key}.bias'] = self.rng.standard_normal(channels, np.float32) * 0.1
    self.state[f'{key}.running_mean'] = self.rng.standard_normal(channels, np.float32) * 0.1
    # Small variances make the epsilon conversion visible (1e-5 vs 1e-3 matters at var ~ 1e-3).
    self.state[f'{key}.running_var'] = self.rng.uniform(1e-3, 2.0, channels).astype(np.float32)
    self.state[f'{key}.num_batches_tracked'] = np.asarray(1000, np.int64)

  def linear(self, key, out_f, in_f):
    self.state[f'{key}.weight'] = self.rng.standard_normal((out_f, in_f), np.float32) * 0.01
    self.state[f'{key}.bias'] = np.zeros(out_f, np.float32)


def torchvision_mobilenet_v2() -> dict:
  """torchvision `mobilenet_v2()` keys: features.0 stem, features.1-17 inverted residuals, features.18."""
  s = StateDict(1)
  s.conv('features.0.0', 32, 3, 3)
  s.bn('features.0.1', 32)
  in_ch, index = 32, 1
  for t, c, n, _ in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                     (6, 160, 3, 2), (6, 320, 1, 1)]:
    for _ in range(n):
      hidden, p = in_ch * t, f'features.{index}.conv'
      if t == 1:
        s.conv(f'{p}.0.0', hidden, 1, 3), s.bn(f'{p}.0.1', hidden)
        s.conv(f'{p}.1', c, hidden, 1), s.bn(f'{p}.2', c)
      else:
        s.conv(f'{p}.0.0', hidden, in_ch, 1), s.bn(f'{p}.0.1', hidden)
        s.conv(f'{p}.1.0', hidden, 1, 3), s.bn(f'{p}.1.1', hidden)
        s.conv(f'{p}.2', c, hidden, 1), s.bn(f'{p}.3', c)
      in_ch, index = c, index + 1
  s.conv('features.18.0', 1280, 320, 1)
  s.bn('features.18.1', 1280)
  s.linear('classifier.1', 1000, 1280)
  return s.state


def torchvision_resnet(units=(3, 4, 6, 3)) -> dict:
  """torchvision `resnet50()` keys: conv1/bn1, layer1-4 bottlenecks (downsample on unit 0), fc."""
  s = StateDict(2)
  s.conv('conv1', 64, 3, 7)
  s.bn('bn1', 64)
  in_ch = 64
  for layer, (planes, blocks) in enumerate(zip((64, 128, 256, 512), units), start=1):
    for j in range(blocks):
      p = f'layer{layer}.{j}'
      s.conv(f'{p}.conv1', planes, in_ch, 1), s.bn(f'{p}.bn1', planes)
      s.conv(f'{p}.conv2', planes, planes, 3), s.bn(f'{p}.bn2', planes)
      s.conv(f'{p}.conv3', planes * 4, planes, 1), s.bn(f'{p}.bn3', planes * 4)
      if j == 0:
        s.conv(f'{p}.downsample.0', planes * 4, in_ch, 1), s.bn(f'{p}.downsample.1', planes * 4)
      in_ch = planes * 4
  s.linear('fc', 1000, 2048)
  return s.state


def timm_xception65() -> dict:
  """timm `xception65` keys: stem.{0,1}.{conv,bn}, blocks.i.stack.conv{k}.{conv_dw,bn_dw,conv_pw,bn_pw},
  blocks.i.shortcut.{conv,bn} where channels or stride change, head.fc."""
  s = StateDict(3)
  s.conv('stem.0.conv', 32, 3, 3), s.bn('stem.0.bn', 32)
  s.conv('stem.1.conv', 64, 32, 3), s.bn('stem.1.bn', 64)
  cfg = ([(64, (128,) * 3, 2, False), (128, (256,) * 3, 2, False), (256, (728,) * 3, 2, False)]
         + [(728, (728,) * 3, 1, False)] * 16
         + [(728, (728, 1024, 1024), 2, False), (1024, (1536, 1536, 2048), 1, True)])
  for i, (in_ch, outs, stride, no_skip) in enumerate(cfg):
    if not no_skip and (outs[-1] != in_ch or stride != 1):
      s.conv(f'blocks.{i}.shortcut.conv', outs[-1], in_ch, 1), s.bn(f'blocks.{i}.shortcut.bn', outs[-1])
    for k, out in enumerate(outs, start=1):
      p = f'blocks.{i}.stack.conv{k}'
      s.conv(f'{p}.conv_dw', in_ch, 1, 3), s.bn(f'{p}.bn_dw', in_ch)
      s.conv(f'{p}.conv_pw', out, in_ch, 1), s.bn(f'{p}.bn_pw', out)
      in_ch = out
  s.linear('head.fc', 1000, 2048)
  return s.state


def torch_conv_bn(pixels, normalise, weight, bn, stride, pad, eps):
  """PyTorch semantics in numpy: conv2d(normalise(x), weight, stride, symmetric zero pad) -> BatchNorm."""
  u = np.pad(normalise(pixels.astype(np.float64)), ((pad, pad), (pad, pad), (0, 0)))
  k = weight.shape[-1]
  size = (u.shape[0] - k) // stride + 1
  out = np.zeros((size, size, weight.shape[0]))
  for i in range(k):
    for j in range(k):
      patch = u[i:i + stride * (size - 1) + 1:stride, j:j + stride * (size - 1) + 1:stride]
      out += patch @ weight[:, :, i, j].T.astype(np.float64)
  return ((out - bn['running_mean']) / np.sqrt(bn['running_var'] + eps)) * bn['weight'] + bn['bias']


def captured(model, variables, pixels, module_path):
  """The output of the submodule at `module_path` (e.g. the stem's BatchNorm) for raw `pixels`."""
  capture = lambda module, _: module.name == module_path[-1]
  apply = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=capture,
                                           mutable=['intermediates'])[1])
  flat = flax.traverse_util.flatten_dict(apply(variables, pixels[None])['intermediates'])
  return np.asarray(flat[tuple(module_path) + ('__call__',)][0][0], np.float64)


def with_backbone(model, variables, scope):
  """Freshly initialised variables of `model` with the converted backbone `scope` put in."""
  full = jax.tree.map(np.asarray, jax.jit(model.init)(jax.random.PRNGKey(0),
                                                      np.zeros((1, 33, 33, 3), np.float32)))
  for collection in ('params', 'batch_stats'):
    full[collection][scope] = variables[collection][scope]
  return full


def bn_of(state, key):
  return {k: state[f'{key}.{k}'].astype(np.float64)
          for k in ('weight', 'bias', 'running_mean', 'running_var')}


def write(tmp_path, name, state):
  path = str(tmp_path / name)
  save_file(state, path)
  return path


def xception_config(backbone='xception_65'):
  config = default.get_config()
  config.model.backbone = backbone
  config.model.depthwise_impl = 'grouped'
  return config


def test_torchvision_mobilenet_v2(tmp_path):
  state = torchvision_mobilenet_v2()
  config = voc_mobilenetv2.get_config('1.0')
  variables, report = pytorch.convert_pytorch(write(tmp_path, 'mnv2.safetensors', state), config)
  assert report['layout'] == 'torchvision_mobilenet_v2' and report['scope'] == 'backbone'
  assert len(report['loaded']) == 255 and len(report['new']) == 17  # all of MobilenetV2; heads new
  skipped = {name for name, _ in report['skipped']}
  assert {'features.18.0.weight', 'classifier.1.weight', 'features.18.1.running_var'} <= skipped
  assert 'features.0.1.num_batches_tracked' in skipped
  assert len(report['loaded']) + len(skipped) == len(state)  # every key accounted for, once
  mobilenet = variables['params']['MobilenetV2']
  # A depthwise kernel: torch [C, 1, kh, kw] -> ours [kh, kw, 1, C].
  np.testing.assert_array_equal(mobilenet['expanded_conv_3']['depthwise']['kernel'][:, :, 0, 5],
                                state['features.4.conv.1.0.weight'][5, 0])
  # A pointwise kernel: torch [O, I, 1, 1] -> ours [1, 1, I, O].
  np.testing.assert_array_equal(mobilenet['expanded_conv_3']['project']['kernel'][0, 0],
                                state['features.4.conv.2.weight'][:, :, 0, 0].T)
  # The stem on raw pixels = torchvision's stem on mean/std-normalised pixels (interior: the padding
  # differs, zeros of the normalised input in torch, the mean pixel in ours).
  model = create_model(config.model)
  full = with_backbone(model, variables, 'MobilenetV2')
  pixels = np.random.default_rng(0).uniform(0, 255, (33, 33, 3)).astype(np.float32)
  ours = captured(model, full, pixels, ('MobilenetV2', 'Conv/BatchNorm'))
  mean, std = np.asarray(pytorch.TORCHVISION_MEAN), np.asarray(pytorch.TORCHVISION_STD)
  theirs = torch_conv_bn(pixels, lambda x: (x / 255 - mean) / std, state['features.0.0.weight'],
                         bn_of(state, 'features.0.1'), stride=2, pad=1, eps=1e-5)
  np.testing.assert_allclose(ours[1:-1, 1:-1], theirs[1:-1, 1:-1], rtol=1e-4, atol=1e-4)
  # Deeper: a BN with var ~1e-3 where epsilon 1e-5 vs 1e-3 would differ by ~40% without the gamma fold.
  var = state['features.4.conv.1.1.running_var']
  gamma = variables['params']['MobilenetV2']['expanded_conv_3']['depthwise/BatchNorm']['scale']
  np.testing.assert_allclose(gamma / np.sqrt(var + 1e-3),
                             state['features.4.conv.1.1.weight'] / np.sqrt(var + 1e-5), rtol=1e-5)


def test_torchvision_resnet50(tmp_path):
  state = torchvision_resnet()
  config = default.get_config()
  config.model.backbone = 'resnet_v1_50'
  variables, report = pytorch.convert_pytorch(write(tmp_path, 'r50.safetensors', state), config)
  assert report['layout'] == 'torchvision_resnet'
  classifier = {n for n, _ in report['skipped'] if not n.endswith('num_batches_tracked')}
  assert classifier == {'fc.weight', 'fc.bias'}
  assert all(path.split(':')[1].startswith(('aspp/', 'decoder/', 'logits/')) for path in report['new'])
  assert any('v1.5' in note for note in report['notes'])  # the stride placement differs: said loudly
  model = create_model(config.model)
  full = with_backbone(model, variables, 'resnet_v1_50')
  pixels = np.random.default_rng(1).uniform(0, 255, (33, 33, 3)).astype(np.float32)
  ours = captured(model, full, pixels, ('resnet_v1_50', 'conv1/BatchNorm'))
  mean, std = np.asarray(pytorch.TORCHVISION_MEAN), np.asarray(pytorch.TORCHVISION_STD)
  theirs = torch_conv_bn(pixels, lambda x: (x / 255 - mean) / std, state['conv1.weight'],
                         bn_of(state, 'bn1'), stride=2, pad=3, eps=1e-5)
  np.testing.assert_allclose(ours[2:-2, 2:-2], theirs[2:-2, 2:-2], rtol=1e-4, atol=1e-4)


def test_timm_xception65_is_an_exact_port(tmp_path):
  state = timm_xception65()
  variables, report = pytorch.convert_pytorch(write(tmp_path, 'x65.safetensors', state), xception_config())
  assert report['layout'] == 'timm_xception'
  weights = [k for k in state if not k.endswith('num_batches_tracked') and not k.startswith('head.')]
  assert len(report['loaded']) == len(weights)  # one TF variable per torch weight/buffer
  assert len(report['loaded']) + len(report['skipped']) == len(state)
  assert {n for n, _ in report['skipped'] if not n.endswith('num_batches_tracked')} == {
      'head.fc.weight', 'head.fc.bias'}
  unit = variables['params']['xception_65']['exit_flow/block1/unit_1/xception_module']
  np.testing.assert_array_equal(unit['separable_conv2_depthwise']['kernel'][:, :, 0, 7],
                                state['blocks.19.stack.conv2.conv_dw.weight'][7, 0])
  np.testing.assert_array_equal(unit['shortcut']['kernel'][0, 0],
                                state['blocks.19.shortcut.conv.weight'][:, :, 0, 0].T)
  # Same normalisation (x*2/255-1), BN epsilon and symmetric stride-2 padding: equal everywhere.
  model = create_model(xception_config().model)
  full = with_backbone(model, variables, 'xception_65')
  pixels = np.random.default_rng(2).uniform(0, 255, (33, 33, 3)).astype(np.float32)
  ours = captured(model, full, pixels, ('xception_65', 'entry_flow/conv1_1/BatchNorm'))
  theirs = torch_conv_bn(pixels, lambda x: x * 2 / 255 - 1, state['stem.0.conv.weight'],
                         bn_of(state, 'stem.0.bn'), stride=2, pad=1, eps=1e-3)
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_wrong_backbone_for_the_state_dict(tmp_path):
  path = write(tmp_path, 'x65.safetensors', timm_xception65())
  with pytest.raises(common.ConversionError, match=r'21 Xception blocks; xception_71 has 23 units'):
    pytorch.convert_pytorch(path, xception_config('xception_71'))
  with pytest.raises(common.ConversionError, match=r'needs config.model.backbone in'):
    pytorch.convert_pytorch(path, voc_mobilenetv2.get_config('1.0'))
  state = torchvision_mobilenet_v2()
  state['features.3.conv.9.weight'] = np.zeros((1,), np.float32)
  with pytest.raises(common.ConversionError, match=r'1 torchvision_mobilenet_v2 state dict keys have no '
                                                   r'place in mobilenet_v2:\n  features.3.conv.9.weight'):
    pytorch.convert_pytorch(write(tmp_path, 'extra.safetensors', state), voc_mobilenetv2.get_config('1.0'))


def test_pth_needs_torch(tmp_path):
  path = str(tmp_path / 'weights.pth')
  state = torchvision_mobilenet_v2()
  if importlib.util.find_spec('torch') is None:
    open(path, 'wb').write(b'PK\x03\x04' + b'not read without torch')
    with pytest.raises(common.ConversionError, match='needs torch, which is not installed'):
      pytorch.load_state_dict(path)
  else:
    import torch  # pylint: disable=g-import-not-at-top
    torch.save({'state_dict': {k: torch.from_numpy(v) for k, v in state.items()}}, path)
    loaded = pytorch.load_state_dict(path)
    np.testing.assert_array_equal(loaded['features.0.0.weight'], state['features.0.0.weight'])


def test_cli_converts_and_reports(tmp_path):
  """`python -m deeplab_jax.convert`: the written checkpoint loads for fine-tuning (backbone only)."""
  source = write(tmp_path, 'mnv2.safetensors', torchvision_mobilenet_v2())
  out = tmp_path / 'out'
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  ok = subprocess.run([sys.executable, '-m', 'deeplab_jax.convert', f'--source={source}',
                       '--config=configs/voc_mobilenetv2.py', f'--output={out}'],
                      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert 'scope backbone: loaded 255, skipped' in ok.stdout and 'left new 17' in ok.stdout
  assert json.loads((out / common.REPORT_FILE).read_text())['layout'] == 'torchvision_mobilenet_v2'
  model = create_model(voc_mobilenetv2.get_config('1.0').model)
  fresh = model.init(jax.random.PRNGKey(0), np.zeros((1, 33, 33, 3), np.float32))
  _, load_report = checkpoint.load_pretrained(str(out), fresh, 'backbone', backbone_scope='MobilenetV2')
  assert len(load_report['loaded']) == 255 and len(load_report['new']) == 17

  bad = subprocess.run([sys.executable, '-m', 'deeplab_jax.convert', f'--source={source}',
                        '--config=configs/voc_mobilenetv2.py:0.5', f'--output={tmp_path / "bad"}'],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1
  assert 'Conversion failed' in bad.stderr and 'depth_multiplier=1.0' in bad.stderr
