"""The one description of each backbone, registered by the backbone's own module.

A `BackboneSpec` says everything the rest of the library needs to know about a backbone: its name in
`config.model.backbone`, the TF variable scope its parameters live under (the official checkpoints' names),
its official BatchNorm constants, its input normalisation, which unit feeds the V3+ decoder at each stride,
the ImageNet classifier variables its published checkpoints carry, and the Flax module that builds it.
`xception.py`, `resnet.py`, `mobilenet_v2.py` and `vgg.py` each call `register(...)` for their variants, so
adding a variant is one `register` call in its family's module; `deeplab.py`, `convert/`, `checkpoint`
callers, `evaluate.py` and the tests read the registry and nothing else.

Every backbone module subclasses `Backbone` (the options `DeepLab` passes to any backbone) and returns
`Features`: the last feature map and its end points by name, so that the decoder tap is chosen in one place
(`DeepLab`) from `BackboneSpec.decoder_end_points`.
"""
import dataclasses
import re
from typing import Any, Dict, Mapping, NamedTuple, Tuple, Type

import flax.linen as nn
import jax
import jax.numpy as jnp

from deeplab_jax.models import layers

Array = jax.Array

# Input normalisations of raw [0, 255] RGB pixels (official `preprocess_utils` / `feature_extractor`).
PREPROCESSINGS = ('inception', 'mean_subtraction')
# ImageNet mean (RGB) of the backbones trained on mean-subtracted inputs (official `_MEAN_RGB`).
IMAGENET_MEAN_RGB = (123.15, 115.90, 103.06)


class Features(NamedTuple):
  """What a backbone returns.

  Attributes:
    out: `[B, H/os, W/os, C]`, the feature map the head reads.
    end_points: unit scope -> that unit's decoder candidate feature (e.g. Xception's
      `separable_conv2_pointwise` BN output), for `BackboneSpec.decoder_end_points`.
  """
  out: Array
  end_points: Dict[str, Array]


class Backbone(nn.Module):
  """Options every backbone receives from `DeepLab`; a family reads the ones that apply to it.

  `spec` holds the family's per-variant constants (`BackboneSpec.variant`); the module's name is the spec's
  TF scope, so parameter paths are the official checkpoint names.
  """
  spec: 'BackboneSpec'
  output_stride: int = 16
  multi_grid: Tuple[int, ...] = (1, 1, 1)
  depth_multiplier: float = 1.0
  bn: layers.BNConfig = layers.BNConfig(0.9997, 1e-3)
  depthwise_impl: str = 'auto'
  dtype: Any = jnp.float32
  remat: bool = False

  def unit(self, module_class: Type[nn.Module]) -> Type[nn.Module]:
    """`module_class`, rematerialised in the backward pass when `remat` is on."""
    return nn.remat(module_class) if self.remat else module_class


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """Everything the library knows about one backbone variant.

  Attributes:
    name: the `config.model.backbone` value, e.g. 'xception_65', 'resnet_v1_101_beta'.
    module: the Flax `Backbone` subclass that builds it.
    scope: the TF variable scope of its parameters ('xception_65', 'resnet_v1_101', 'MobilenetV2').
    variant: family-specific constants passed to the module (block layout, units per block, ...).
    bn_decay: the official BatchNorm decay (config.model.bn_decay < 0 selects it).
    bn_epsilon: the official BatchNorm epsilon.
    preprocessing: 'inception' (x*2/255-1) or 'mean_subtraction' (x - ImageNet mean).
    decoder_end_points: decoder output stride -> the `Features.end_points` key it reads.
    imagenet_classifier: regex of the ImageNet classifier variables of its published checkpoints (TF
      names), which DeepLab does not build ('' if none).
    multi_grid: whether `config.model.multi_grid` applies (the last block's unit rates).
    depth_multiplier: whether `config.model.depth_multiplier` applies.
  """
  name: str
  module: Type[Backbone]
  scope: str
  variant: Mapping[str, Any]
  bn_decay: float
  bn_epsilon: float
  preprocessing: str = 'inception'
  decoder_end_points: Mapping[int, str] = dataclasses.field(default_factory=dict)
  imagenet_classifier: str = ''
  multi_grid: bool = False
  depth_multiplier: bool = False

  def __post_init__(self):
    if self.preprocessing not in PREPROCESSINGS:
      raise ValueError(f'{self.name}: preprocessing={self.preprocessing!r} is not one of {PREPROCESSINGS}.')

  def __hash__(self):  # Flax hashes module fields; the mappings are not hashable.
    return hash(self.name)

  def __eq__(self, other):
    return isinstance(other, BackboneSpec) and other.name == self.name

  @property
  def mean_pixel(self) -> Tuple[float, float, float]:
    """The raw pixel that preprocesses to zero: what images are padded with (official `mean_pixel`)."""
    return IMAGENET_MEAN_RGB if self.preprocessing == 'mean_subtraction' else (127.5, 127.5, 127.5)

  def preprocess(self, images: Array) -> Array:
    """Official input normalisation of raw [0, 255] RGB pixels `[B, H, W, 3]`."""
    images = images.astype(jnp.float32)
    if self.preprocessing == 'mean_subtraction':
      return images - jnp.asarray(IMAGENET_MEAN_RGB, jnp.float32)
    return images * (2.0 / 255.0) - 1.0

  def is_imagenet_classifier(self, tf_name: str) -> bool:
    """Whether a TF checkpoint variable is this backbone's ImageNet classifier (not part of DeepLab)."""
    return bool(self.imagenet_classifier) and re.match(self.imagenet_classifier, tf_name) is not None


_REGISTRY: Dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
  """Adds a backbone variant; called at import by the module that implements it."""
  if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
    raise ValueError(f'Backbone {spec.name!r} is registered twice.')
  _REGISTRY[spec.name] = spec
  return spec


def names() -> Tuple[str, ...]:
  """All registered `config.model.backbone` values."""
  return tuple(_REGISTRY)


def get(name: str) -> BackboneSpec:
  """The spec of `config.model.backbone`, with an error listing the allowed names."""
  if name not in _REGISTRY:
    raise ValueError(f'config.model.backbone={name!r} is not one of {names()}.')
  return _REGISTRY[name]


def scopes() -> Tuple[str, ...]:
  """The TF scopes of all registered backbones (several variants may share one)."""
  return tuple(dict.fromkeys(spec.scope for spec in _REGISTRY.values()))
