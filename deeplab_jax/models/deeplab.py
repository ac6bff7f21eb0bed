"""DeepLab (V1, V2, V3, V3+) assembled from `config.model` alone: `create_model(config.model)`.

`DeepLab`'s fields are the fields of `config.model` (configs/default.py), with the same names and meanings,
so `create_model` is `DeepLab(**config.model)` after one validation pass. The model takes raw RGB pixels in
[0, 255] and does the official preprocessing of its backbone itself, so that a padded eval batch (mean
pixel) and a user's `model.apply(variables, images)` need nothing else. It returns logits at the input size
(bilinear, align_corners), or with `upsample=False` the logits at `model.logits_stride` that the official
multi-scale evaluation merges. It also sows 'backbone_features', 'decoder_tap', 'aspp_projection' into the
'intermediates' collection, for tests against the official graph and debugging.
"""
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from deeplab_jax.models import backbones
from deeplab_jax.models import heads
from deeplab_jax.models import layers
# Importing the backbone modules registers their variants.
from deeplab_jax.models import mobilenet_v2  # pylint: disable=unused-import
from deeplab_jax.models import resnet  # pylint: disable=unused-import
from deeplab_jax.models import vgg  # pylint: disable=unused-import
from deeplab_jax.models import xception  # pylint: disable=unused-import

Array = jax.Array

HEADS = ('aspp', 'largefov', 'aspp_l')
OUTPUT_STRIDES = (8, 16, 32)
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def backbone_spec(model_config) -> backbones.BackboneSpec:
  """The registered description of `config.model.backbone`."""
  return backbones.get(model_config.backbone)


def backbone_scope(model_config) -> str:
  """The top-level parameter scope of the backbone (its TF scope), e.g. 'xception_65', 'MobilenetV2'."""
  return backbone_spec(model_config).scope


def mean_pixel(model_config) -> Tuple[float, float, float]:
  """The raw pixel that preprocesses to zero for this backbone: what images are padded with."""
  return backbone_spec(model_config).mean_pixel


class DeepLab(nn.Module):
  """DeepLab segmentation model; the fields are `config.model`'s (see configs/default.py).

  `__call__(images [B, H, W, 3] raw RGB in [0, 255], train, upsample=True)` returns float32 logits
  `[B, H, W, num_classes]`, or with `upsample=False` the logits at stride `logits_stride`.
  Build it with `create_model(config.model)`, which validates the fields and scales the atrous rates.
  """
  backbone: str = 'xception_65'
  head: str = 'aspp'
  num_classes: int = 21
  output_stride: int = 16
  atrous_rates: Tuple[int, ...] = (6, 12, 18)
  multi_grid: Tuple[int, ...] = (1, 1, 1)
  depth_multiplier: float = 1.0
  aspp_with_separable_conv: bool = True
  aspp_with_image_pooling: bool = True
  aspp_filters: int = 256
  decoder_output_stride: int = 4
  decoder_use_separable_conv: bool = True
  decoder_filters: int = 256
  logits_kernel_size: int = 1
  largefov_hidden: int = 1024
  aspp_l_hidden: int = 1024
  dropout_rate: float = 0.1
  fine_tune_batch_norm: bool = True
  bn_decay: float = -1.0
  head_bn_decay: float = -1.0
  depthwise_impl: str = 'auto'
  dtype: str = 'float32'
  remat: bool = False

  @property
  def spec(self) -> backbones.BackboneSpec:
    return backbones.get(self.backbone)

  @property
  def uses_decoder(self) -> bool:
    return self.head == 'aspp' and bool(self.decoder_output_stride)

  @property
  def logits_stride(self) -> int:
    """Stride of the logits before the final upsampling: the decoder's, else the backbone's."""
    return self.decoder_output_stride if self.uses_decoder else self.output_stride

  def _backbone(self) -> nn.Module:
    spec = self.spec
    decay = self.bn_decay if self.bn_decay >= 0 else spec.bn_decay
    return spec.module(spec, output_stride=self.output_stride, multi_grid=tuple(self.multi_grid),
                       depth_multiplier=self.depth_multiplier,
                       bn=layers.BNConfig(decay, spec.bn_epsilon), depthwise_impl=self.depthwise_impl,
                       dtype=DTYPES[self.dtype], remat=self.remat, name=spec.scope)

  @nn.compact
  def __call__(self, images: Array, train: bool = False, upsample: bool = True) -> Array:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'DeepLab expects images [B, H, W, 3] (raw RGB 0..255); got {images.shape}.')
    height, width = images.shape[1], images.shape[2]
    dtype = DTYPES[self.dtype]
    bn_train = train and self.fine_tune_batch_norm
    x = self.spec.preprocess(images).astype(dtype)
    features = self._backbone()(x, train=bn_train)
    self.sow('intermediates', 'backbone_features', features.out)
    if self.head == 'aspp':
      head_bn = layers.BNConfig(self.head_bn_decay if self.head_bn_decay >= 0 else heads.HEAD_BN.decay,
                                heads.HEAD_BN.epsilon)
      x = heads.ASPP(tuple(self.atrous_rates), self.aspp_filters, self.aspp_with_separable_conv,
                     self.aspp_with_image_pooling, self.dropout_rate, bn=head_bn,
                     depthwise_impl=self.depthwise_impl, dtype=dtype, name='aspp')(
                         features.out, train=bn_train)
      self.sow('intermediates', 'aspp_projection', x)
      if self.uses_decoder:
        low_level = features.end_points[self.spec.decoder_end_points[self.decoder_output_stride]]
        self.sow('intermediates', 'decoder_tap', low_level)
        size = (layers.scale_dimension(height, 1.0 / self.decoder_output_stride),
                layers.scale_dimension(width, 1.0 / self.decoder_output_stride))
        x = heads.Decoder(self.decoder_filters, separable=self.decoder_use_separable_conv, bn=head_bn,
                          depthwise_impl=self.depthwise_impl, dtype=dtype, name='decoder')(
                              x, low_level, size, train=bn_train)
      logits = layers.conv(x, self.num_classes, self.logits_kernel_size, name='logits/semantic',
                           use_bias=True, dtype=dtype,
                           kernel_init=nn.initializers.truncated_normal(0.01))
    elif self.head == 'largefov':
      logits = heads.LargeFOV(self.num_classes, self.atrous_rates[0], self.largefov_hidden,
                              self.dropout_rate, dtype, name='largefov')(features.out, train)
    else:
      logits = heads.ASPPL(self.num_classes, tuple(self.atrous_rates), self.aspp_l_hidden,
                           self.dropout_rate, dtype, name='aspp_l')(features.out, train)
    logits = logits.astype(jnp.float32)
    if not upsample:
      return logits
    return layers.resize_bilinear(logits, (height, width))


def _check(field: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f'config.model.{field}={value!r} is not one of {tuple(allowed)}.')


def validate_model_config(m: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the `config.model` field and its allowed values for anything DeepLab cannot build.

  Nothing is silently ignored: an option that does not apply to the chosen backbone or head is rejected when
  it differs from its neutral value.
  """
  unknown = sorted(set(m.keys()) - set(DeepLab.__dataclass_fields__) - {'parent', 'name'})
  if unknown:
    raise ValueError(f'config.model has unknown fields {unknown}; DeepLab takes '
                     f'{sorted(f for f in DeepLab.__dataclass_fields__ if f not in ("parent", "name"))}.')
  _check('backbone', m.backbone, backbones.names())
  _check('head', m.head, HEADS)
  _check('output_stride', m.output_stride, OUTPUT_STRIDES)
  _check('depthwise_impl', m.depthwise_impl, layers.DEPTHWISE_IMPLS)
  _check('dtype', m.dtype, tuple(DTYPES))
  spec = backbones.get(m.backbone)
  if m.decoder_output_stride and m.head == 'aspp':
    _check('decoder_output_stride', m.decoder_output_stride, (0,) + tuple(spec.decoder_end_points))
  if m.head != 'aspp' and m.decoder_output_stride:
    raise ValueError(f'config.model.decoder_output_stride={m.decoder_output_stride}: the {m.head} head has no '
                     'decoder; set it to 0.')
  if m.head == 'largefov':
    if len(m.atrous_rates) != 1:
      raise ValueError(f'config.model.atrous_rates={tuple(m.atrous_rates)}: the largefov head takes one '
                       'rate (fc6, 12 at output stride 8).')
    if m.backbone != 'vgg_16':
      raise ValueError('config.model.head=largefov is the VGG-16 DeepLab-v1 head: set backbone=vgg_16.')
  if not spec.multi_grid and tuple(m.multi_grid) != (1, 1, 1):
    raise ValueError(f'config.model.multi_grid={tuple(m.multi_grid)} does not apply to {m.backbone}: set it '
                     'to (1, 1, 1).')
  for field in ('bn_decay', 'head_bn_decay'):
    if not m[field] < 1.0:
      raise ValueError(f'config.model.{field}={m[field]} must be below 1 (a moving-average decay in [0, 1)), '
                       'or negative for the official value.')
  if m.head != 'aspp' and m.head_bn_decay >= 0:
    raise ValueError(f'config.model.head_bn_decay={m.head_bn_decay} does not apply to the {m.head} head (no '
                     'BatchNorm): set it to -1.')
  if not spec.depth_multiplier and m.depth_multiplier != 1.0:
    raise ValueError(f'config.model.depth_multiplier={m.depth_multiplier} only applies to MobileNetV2: set it '
                     'to 1.0.')


def create_model(model_config: ml_collections.ConfigDict, output_stride: Optional[int] = None) -> DeepLab:
  """`DeepLab(**config.model)` after validation; `output_stride` overrides it and scales the atrous rates.

  Rates in the config are those at `config.model.output_stride` (the official recipes: 6/12/18 at OS16,
  12/24/36 at OS8), so evaluating an OS16-trained model at OS8 doubles them, as the official eval flags do.
  """
  validate_model_config(model_config)
  fields = model_config.to_dict()
  output_stride = output_stride or model_config.output_stride
  _check('output_stride (override)', output_stride, OUTPUT_STRIDES)
  fields['atrous_rates'] = tuple(int(round(r * model_config.output_stride / output_stride))
                                 for r in model_config.atrous_rates)
  fields['multi_grid'] = tuple(model_config.multi_grid)
  fields['output_stride'] = output_stride
  return DeepLab(**fields)
