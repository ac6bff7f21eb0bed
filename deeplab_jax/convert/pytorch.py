"""Imports PyTorch ImageNet backbones (state dicts as `.safetensors`, or `.pth` when torch is installed).

Layouts, detected from the keys:
  * timm `xception41/65/71` (aligned Xception ported from the official TF ImageNet weights): mapped unit
    by unit onto `xception_<n>/<flow>/block<b>/unit_<u>/xception_module/...`. timm uses the same input
    normalisation (mean = std = 0.5, i.e. x*2/255-1), BN epsilon 1e-3 and symmetric padding of strided convs,
    so the converted backbone computes what timm's does. timm's stride-4 feature (`blocks.1.stack.act3`) is
    taken after a ReLU; the DeepLab decoder (ours) taps the same unit before it.
  * torchvision ResNet-50/101 -> our `resnet_v1_50/101` (7x7 stem). torchvision is ResNet "v1.5": each stage
    strides in its FIRST unit (conv2 and the projection shortcut), while slim/DeepLab `resnet_v1` strides in
    the LAST unit of blocks 1-3 (identity shortcuts subsampled). The weights map one to one (same shapes), but
    the network is not the same function: use them to initialise fine-tuning, not as an exact port.
  * torchvision MobileNetV2 (width 1.0) -> our `MobilenetV2` (`features.18`, the 1280-channel conv, and the
    classifier are skipped). Strided convs pad (1, 1) in PyTorch and TF-SAME in ours: equal on odd input sizes
    (513), one pixel apart on even ones.

PyTorch conventions converted: OIHW kernels -> HWIO (depthwise `[C, 1, kh, kw]` -> `[kh, kw, C, 1]`);
BatchNorm epsilon (torchvision 1e-5) -> ours by rescaling gamma, `gamma * sqrt((var + eps_ours) /
(var + eps_torch))`, exact at inference; ImageNet mean/std input normalisation folded into the first conv
(per-channel kernel scale, exact; the mean offset into the BN moving mean, exact away from the zero-padded
border). `running_var` is PyTorch's unbiased estimate and is used as is (inference uses it directly in both
frameworks); BN momentum 0.1 is decay 0.9 and is not a weight (`config.model.bn_decay` sets ours).
`num_batches_tracked` is skipped.
"""
import re
from typing import Dict, List, Tuple

import ml_collections
import numpy as np

from deeplab_jax import models
from deeplab_jax.convert import common
from deeplab_jax.models import resnet
from deeplab_jax.models import xception

ConversionError = common.ConversionError
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)
TORCHVISION_BN_EPSILON = 1e-5
TIMM_XCEPTION_BN_EPSILON = 1e-3
LAYOUTS = ('timm_xception', 'torchvision_resnet', 'torchvision_mobilenet_v2')


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """`{key: float32 array}` from `.safetensors` (needs `safetensors`) or `.pth`/`.pt`/`.bin` (needs torch).

  The file's first bytes are checked before any reader is imported, so that a damaged or foreign file is
  reported as such (naming it) rather than as a missing package.

  Raises:
    ConversionError: naming `path`, for an empty, truncated or foreign file, or a missing reader package.
  """
  with open(path, 'rb') as f:
    head = f.read(16)
    size = f.seek(0, 2)
  if not size:
    raise ConversionError(f'{path} is empty (0 bytes): not a PyTorch state dict. Download it again.')
  if path.endswith('.safetensors'):
    # safetensors: a little-endian uint64 header length, then that many bytes of JSON starting with '{'.
    header_length = int.from_bytes(head[:8], 'little') if len(head) >= 8 else -1
    if not 0 < header_length <= size - 8 or head[8:9] != b'{':
      raise ConversionError(f'{path} is not a safetensors file, or is truncated ({size} bytes, starting '
                            f'{head[:8]!r}). Download it again.')
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ConversionError('Reading .safetensors needs the safetensors package: '
                            'pip install "deeplab_jax[pytorch]".') from e
    try:
      state = load_file(path)
    except Exception as e:  # safetensors raises SafetensorError (and others) for damaged files.
      raise ConversionError(f'{path} is a damaged or truncated safetensors file ({type(e).__name__}: '
                            f'{" ".join(str(e).split())}). Download it again.') from e
  else:
    # torch.save writes a zip archive ('PK'); the legacy format starts with a pickle protocol byte (0x80).
    if not (head.startswith(b'PK\x03\x04') or head[:1] == b'\x80'):
      raise ConversionError(f'{path} is not a PyTorch state dict: torch.save files start with a zip ("PK") '
                            f'or pickle (0x80) header, this one with {head[:8]!r} ({size} bytes). Pass a '
                            '.pth/.bin written by torch.save, or a .safetensors file.')
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ConversionError(
          f'Reading {path} (a pickled PyTorch state dict) needs torch, which is not installed. Install '
          'torch, or convert the file to safetensors where torch is available: '
          '`safetensors.torch.save_file(torch.load(path), "weights.safetensors")`.') from e
    try:
      state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for damaged files.
      raise ConversionError(f'{path} cannot be loaded by torch.load ({type(e).__name__}: '
                            f'{" ".join(str(e).split())[:300]}): truncated, damaged, or not a state dict of '
                            'tensors.') from e
    for wrapper in ('state_dict', 'model', 'model_state'):
      if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
        state = state[wrapper]
    if not isinstance(state, dict):
      raise ConversionError(f'{path} holds a {type(state).__name__}, not a state dict (a dict of tensors).')
    state = {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, 'detach')}
  # DataParallel / DDP checkpoints prefix every key with `module.`.
  return {re.sub(r'^module\.', '', k): np.asarray(v) for k, v in state.items()}


def detect_layout(keys) -> str:
  """Which known PyTorch layout the state dict keys follow."""
  keys = set(keys)
  if 'stem.0.conv.weight' in keys and any(k.startswith('blocks.') for k in keys):
    return 'timm_xception'
  if 'conv1.weight' in keys and 'layer1.0.conv1.weight' in keys:
    return 'torchvision_resnet'
  if 'features.0.0.weight' in keys and 'features.1.conv.0.0.weight' in keys:
    return 'torchvision_mobilenet_v2'
  raise ConversionError('Unknown PyTorch state dict layout: expected timm xception (stem.0.conv.weight, '
                        'blocks.*), torchvision ResNet (conv1.weight, layer1.*) or torchvision MobileNetV2 '
                        f'(features.0.0.weight); first keys: {sorted(keys)[:8]}.')


class _Mapper:
  """Collects TF-named arrays from PyTorch keys and remembers which keys were used."""

  def __init__(self, state: Dict[str, np.ndarray], source_eps: float, target_eps: float):
    self.state, self.used = state, set()
    self.source_eps, self.target_eps = source_eps, target_eps
    self.arrays: Dict[str, np.ndarray] = {}

  def _take(self, key: str) -> np.ndarray:
    if key not in self.state:
      raise ConversionError(f'The state dict has no {key!r}: not a complete backbone of this kind '
                            '(wrong --config for this source?).')
    self.used.add(key)
    return np.asarray(self.state[key], np.float32)

  def conv(self, key: str, tf_scope: str) -> None:
    weight = self._take(f'{key}.weight')  # [O, I, kh, kw]
    self.arrays[f'{tf_scope}/weights'] = np.transpose(weight, (2, 3, 1, 0))

  def depthwise(self, key: str, tf_scope: str) -> None:
    weight = self._take(f'{key}.weight')  # [C, 1, kh, kw]
    self.arrays[f'{tf_scope}/depthwise_weights'] = np.transpose(weight, (2, 3, 0, 1))

  def bn(self, key: str, tf_scope: str) -> None:
    var = self._take(f'{key}.running_var')
    gamma = self._take(f'{key}.weight')
    if self.source_eps != self.target_eps:
      gamma = gamma * np.sqrt((var + self.target_eps) / (var + self.source_eps))
    self.arrays[f'{tf_scope}/BatchNorm/gamma'] = gamma
    self.arrays[f'{tf_scope}/BatchNorm/beta'] = self._take(f'{key}.bias')
    self.arrays[f'{tf_scope}/BatchNorm/moving_mean'] = self._take(f'{key}.running_mean')
    self.arrays[f'{tf_scope}/BatchNorm/moving_variance'] = var

  def fold_input_normalization(self, tf_scope: str, scale, offset) -> None:
    """Makes the first conv + BN take our preprocessed input `v` where the source took `u = v*scale + offset`.

    conv(u) = conv_{K*scale}(v) + sum_{h,w,c} K[h,w,c,:] * offset_c away from the padded border, so the kernel
    is scaled per input channel and the constant moves into the BN moving mean.
    """
    kernel = self.arrays[f'{tf_scope}/weights']
    scale = np.asarray(scale, np.float64)
    offset = np.asarray(offset, np.float64)
    shift = np.einsum('hwco,c->o', kernel.astype(np.float64), offset)
    self.arrays[f'{tf_scope}/weights'] = (kernel * scale[None, None, :, None]).astype(np.float32)
    mean = self.arrays[f'{tf_scope}/BatchNorm/moving_mean'].astype(np.float64)
    self.arrays[f'{tf_scope}/BatchNorm/moving_mean'] = (mean - shift).astype(np.float32)


def _map_timm_xception(state, model_config) -> Tuple[_Mapper, List[str]]:
  variant = model_config.backbone
  spec = models.backbone_spec(model_config)
  if spec.module is not xception.Xception:
    xceptions = tuple(name for name in models.backbones.names()
                      if models.backbones.get(name).module is xception.Xception)
    raise ConversionError(f'A timm xception state dict needs config.model.backbone in {xceptions}, not '
                          f'{variant!r}.')
  m = _Mapper(state, TIMM_XCEPTION_BN_EPSILON, spec.bn_epsilon)
  for i, name in enumerate(('conv1_1', 'conv1_2')):
    m.conv(f'stem.{i}.conv', f'{variant}/entry_flow/{name}')
    m.bn(f'stem.{i}.bn', f'{variant}/entry_flow/{name}')
  units = xception.unit_scopes(spec.variant['blocks'])
  num_blocks = len({k.split('.')[1] for k in state if k.startswith('blocks.')})
  if num_blocks != len(units):
    raise ConversionError(f'The timm state dict has {num_blocks} Xception blocks; {variant} has '
                          f'{len(units)} units (wrong --config.model.backbone for this source?).')
  for i, unit in enumerate(units):
    scope = f'{variant}/{unit}/xception_module'
    for k in (1, 2, 3):
      m.depthwise(f'blocks.{i}.stack.conv{k}.conv_dw', f'{scope}/separable_conv{k}_depthwise')
      m.bn(f'blocks.{i}.stack.conv{k}.bn_dw', f'{scope}/separable_conv{k}_depthwise')
      m.conv(f'blocks.{i}.stack.conv{k}.conv_pw', f'{scope}/separable_conv{k}_pointwise')
      m.bn(f'blocks.{i}.stack.conv{k}.bn_pw', f'{scope}/separable_conv{k}_pointwise')
    if f'blocks.{i}.shortcut.conv.weight' in state:
      m.conv(f'blocks.{i}.shortcut.conv', f'{scope}/shortcut')
      m.bn(f'blocks.{i}.shortcut.bn', f'{scope}/shortcut')
  return m, ['timm xception: same input normalisation, BN epsilon and padding as ours; exact port.']


def _map_torchvision_resnet(state, model_config) -> Tuple[_Mapper, List[str]]:
  spec = models.backbone_spec(model_config)
  if spec.module is not resnet.ResNet or spec.variant['beta']:
    stems = tuple(name for name in models.backbones.names()
                  if models.backbones.get(name).module is resnet.ResNet
                  and not models.backbones.get(name).variant['beta'])
    raise ConversionError(f'A torchvision ResNet (7x7 stem) needs config.model.backbone in {stems}, not '
                          f'{model_config.backbone!r}.')
  backbone = spec.scope
  m = _Mapper(state, TORCHVISION_BN_EPSILON, spec.bn_epsilon)
  m.conv('conv1', f'{backbone}/conv1')
  m.bn('bn1', f'{backbone}/conv1')
  for layer in (1, 2, 3, 4):
    units = sorted({int(k.split('.')[1]) for k in state if k.startswith(f'layer{layer}.')})
    for j in units:
      scope = f'{backbone}/block{layer}/unit_{j + 1}/bottleneck_v1'
      for c in (1, 2, 3):
        m.conv(f'layer{layer}.{j}.conv{c}', f'{scope}/conv{c}')
        m.bn(f'layer{layer}.{j}.bn{c}', f'{scope}/conv{c}')
      if f'layer{layer}.{j}.downsample.0.weight' in state:
        m.conv(f'layer{layer}.{j}.downsample.0', f'{scope}/shortcut')
        m.bn(f'layer{layer}.{j}.downsample.1', f'{scope}/shortcut')
  # torchvision takes (x/255 - mean)/std; ours takes x - mean_pixel (0..255).
  ours = np.asarray(models.mean_pixel(model_config), np.float64)
  mean, std = np.asarray(TORCHVISION_MEAN), np.asarray(TORCHVISION_STD)
  m.fold_input_normalization(f'{backbone}/conv1', 1.0 / (255.0 * std), (ours - 255.0 * mean) / (255.0 * std))
  return m, ['torchvision ResNet is v1.5 (stride in the first unit of each stage); ours is slim resnet_v1 '
             '(stride in the last unit of blocks 1-3): same shapes, different function, so fine-tune.',
             'ImageNet mean/std normalisation folded into conv1; BN epsilon 1e-5 kept.']


def _map_torchvision_mobilenet_v2(state, model_config) -> Tuple[_Mapper, List[str]]:
  if model_config.backbone != 'mobilenet_v2' or model_config.depth_multiplier != 1.0:
    raise ConversionError('A torchvision MobileNetV2 (width 1.0) needs config.model.backbone=mobilenet_v2 '
                          f'and depth_multiplier=1.0, not {model_config.backbone!r} '
                          f'x{model_config.depth_multiplier}.')
  m = _Mapper(state, TORCHVISION_BN_EPSILON, models.backbone_spec(model_config).bn_epsilon)
  m.conv('features.0.0', 'MobilenetV2/Conv')
  m.bn('features.0.1', 'MobilenetV2/Conv')
  m.depthwise('features.1.conv.0.0', 'MobilenetV2/expanded_conv/depthwise')
  m.bn('features.1.conv.0.1', 'MobilenetV2/expanded_conv/depthwise')
  m.conv('features.1.conv.1', 'MobilenetV2/expanded_conv/project')
  m.bn('features.1.conv.2', 'MobilenetV2/expanded_conv/project')
  for k in range(2, 18):
    scope = f'MobilenetV2/expanded_conv_{k - 1}'
    m.conv(f'features.{k}.conv.0.0', f'{scope}/expand')
    m.bn(f'features.{k}.conv.0.1', f'{scope}/expand')
    m.depthwise(f'features.{k}.conv.1.0', f'{scope}/depthwise')
    m.bn(f'features.{k}.conv.1.1', f'{scope}/depthwise')
    m.conv(f'features.{k}.conv.2', f'{scope}/project')
    m.bn(f'features.{k}.conv.3', f'{scope}/project')
  # torchvision takes (x/255 - mean)/std; ours takes v = x*2/255 - 1, i.e. x/255 = (v + 1)/2.
  mean, std = np.asarray(TORCHVISION_MEAN), np.asarray(TORCHVISION_STD)
  m.fold_input_normalization('MobilenetV2/Conv', 1.0 / (2.0 * std), (0.5 - mean) / std)
  return m, ['ImageNet mean/std normalisation folded into MobilenetV2/Conv; BN epsilon 1e-5 -> 1e-3 '
             'folded into gamma; strided convs pad (1,1) in PyTorch, TF-SAME in ours (equal on odd sizes).']


_MAPPERS = {'timm_xception': _map_timm_xception, 'torchvision_resnet': _map_torchvision_resnet,
            'torchvision_mobilenet_v2': _map_torchvision_mobilenet_v2}
# Keys of the ImageNet classifiers and of layers DeepLab does not build.
_NOT_DEEPLAB = re.compile(r'^(head\.|fc\.|classifier\.|features\.18\.)')


def state_dict_to_tf_arrays(state: Dict[str, np.ndarray], model_config: ml_collections.ConfigDict
                            ) -> Tuple[Dict[str, np.ndarray], List[Tuple[str, str]], str, List[str]]:
  """`(TF-named arrays, skipped [(key, reason)], layout, notes)`; every other key must map.

  Raises:
    ConversionError: for an unknown layout, a missing key, or keys this layout does not explain.
  """
  layout = detect_layout(state)
  mapper, notes = _MAPPERS[layout](state, model_config)
  skipped = [(k, 'ImageNet classifier / layer DeepLab does not build') for k in sorted(state)
             if _NOT_DEEPLAB.match(k)]
  skipped += [(k, 'BN step counter, not a weight') for k in sorted(state)
              if k.endswith('num_batches_tracked') and not _NOT_DEEPLAB.match(k)]
  done = mapper.used | {k for k, _ in skipped}
  unmapped = sorted(set(state) - done)
  if unmapped:
    raise ConversionError(f'{len(unmapped)} {layout} state dict keys have no place in '
                          f'{model_config.backbone}:\n  ' + '\n  '.join(unmapped[:50]))
  return mapper.arrays, skipped, layout, notes


def convert_pytorch(path: str, config: ml_collections.ConfigDict, scope: str = 'backbone'
                    ) -> Tuple[dict, dict]:
  """Reads an ImageNet backbone state dict and returns `(variables, report)` (backbone only)."""
  arrays, skipped, layout, notes = state_dict_to_tf_arrays(load_state_dict(path), config.model)
  variables, report = common.assign(arrays, config.model, scope, skipped)
  report.update(format='pytorch', layout=layout, notes=notes)
  return variables, report
