"""DeepLab (V1, V2, V3, V3+) assembled from `config.model` alone.

The model takes raw RGB pixels in [0, 255] and does the official preprocessing itself, so that a padded
eval batch (mean pixel) and a user's `model.apply(variables, images)` need nothing else. It returns logits
at the input size (bilinear, align_corners) and sows 'backbone_features', 'decoder_tap', 'aspp_projection'
and 'logits_small' into the 'intermediates' collection for tests and debugging.
"""
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from deeplab_jax.models import heads
from deeplab_jax.models import layers
from deeplab_jax.models import mobilenet_v2
from deeplab_jax.models import resnet
from deeplab_jax.models import vgg
from deeplab_jax.models import xception

Array = jax.Array

BACKBONES = ('xception_41', 'xception_65', 'xception_71', 'resnet_v1_50', 'resnet_v1_50_beta',
             'resnet_v1_101', 'resnet_v1_101_beta', 'mobilenet_v2', 'vgg_16')
HEADS = ('aspp', 'largefov', 'aspp_l')
OUTPUT_STRIDES = (8, 16, 32)
# ImageNet mean (RGB) for the backbones trained on mean-subtracted inputs (official `_MEAN_RGB`).
_MEAN_RGB = (123.15, 115.90, 103.06)
_OFFICIAL_BN_DECAY = {'xception': 0.9997, 'resnet': 0.95, 'mobilenet_v2': 0.997}
_BACKBONE_BN_EPSILON = {'xception': 1e-3, 'resnet': 1e-5, 'mobilenet_v2': 1e-3}


def _family(backbone: str) -> str:
  """'xception', 'resnet', 'mobilenet_v2' or 'vgg'."""
  return next(f for f in ('xception', 'resnet', 'mobilenet_v2', 'vgg') if backbone.startswith(f))


def subtracts_mean(backbone: str) -> bool:
  """True for backbones whose official preprocessing subtracts the ImageNet mean (else x*2/255-1)."""
  return backbone in ('resnet_v1_50', 'resnet_v1_101', 'vgg_16')


def mean_pixel(model_config) -> Tuple[float, float, float]:
  """The pixel value that preprocesses to zero: what images are padded with (official `mean_pixel`)."""
  return _MEAN_RGB if subtracts_mean(model_config.backbone) else (127.5, 127.5, 127.5)


def preprocess(images: Array, backbone: str) -> Array:
  """Official input normalisation of raw [0, 255] RGB pixels."""
  images = images.astype(jnp.float32)
  if subtracts_mean(backbone):
    return images - jnp.asarray(_MEAN_RGB, jnp.float32)
  return images * (2.0 / 255.0) - 1.0


class DeepLab(nn.Module):
  """DeepLab segmentation model. Build it with `create_model(config.model)`.

  `__call__(images [B, H, W, 3] raw RGB in [0, 255], train) -> logits [B, H, W, num_classes]` (float32).
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
  head_hidden: int = 1024
  dropout_rate: float = 0.1
  fine_tune_batch_norm: bool = True
  bn_decay: float = -1.0
  depthwise_impl: str = 'auto'
  dtype: Any = jnp.float32
  remat: bool = False

  def _backbone(self) -> nn.Module:
    family = _family(self.backbone)
    decay = self.bn_decay if self.bn_decay >= 0 else _OFFICIAL_BN_DECAY.get(family, 0.9997)
    bn = layers.BNConfig(decay, _BACKBONE_BN_EPSILON.get(family, 1e-3))
    low_level_stride = self.decoder_output_stride or 4
    common = dict(output_stride=self.output_stride, dtype=self.dtype, remat=self.remat)
    if family == 'xception':
      return xception.Xception(self.backbone, multi_grid=self.multi_grid, bn=bn,
                               low_level_stride=low_level_stride,
                               depthwise_impl=self.depthwise_impl, name=self.backbone, **common)
    if family == 'resnet':
      depth = self.backbone.replace('_beta', '')
      return resnet.ResNet(depth, beta=self.backbone.endswith('_beta'), multi_grid=self.multi_grid,
                           low_level_stride=low_level_stride, bn=bn, name=depth, **common)
    if family == 'mobilenet_v2':
      return mobilenet_v2.MobileNetV2(self.depth_multiplier, low_level_stride=low_level_stride, bn=bn,
                                      depthwise_impl=self.depthwise_impl, name='MobilenetV2',
                                      **common)
    return vgg.VGG16(name='vgg_16', **common)

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Array:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'DeepLab expects images [B, H, W, 3] (raw RGB 0..255); got {images.shape}.')
    height, width = images.shape[1], images.shape[2]
    bn_train = train and self.fine_tune_batch_norm
    x = preprocess(images, self.backbone).astype(self.dtype)
    features = self._backbone()(x, train=bn_train)
    self.sow('intermediates', 'backbone_features', features['out'])
    if self.head == 'aspp':
      x = heads.ASPP(self.atrous_rates, self.aspp_filters, self.aspp_with_separable_conv,
                     self.aspp_with_image_pooling, self.dropout_rate,
                     depthwise_impl=self.depthwise_impl, dtype=self.dtype, name='aspp')(
                         features['out'], train=bn_train)
      self.sow('intermediates', 'aspp_projection', x)
      if self.decoder_output_stride:
        if features['low_level'] is None:
          raise ValueError(f'{self.backbone} has no decoder end point at stride '
                           f'{self.decoder_output_stride}.')
        self.sow('intermediates', 'decoder_tap', features['low_level'])
        size = (layers.scale_dimension(height, 1.0 / self.decoder_output_stride),
                layers.scale_dimension(width, 1.0 / self.decoder_output_stride))
        x = heads.Decoder(self.decoder_filters, separable=self.decoder_use_separable_conv,
                          depthwise_impl=self.depthwise_impl, dtype=self.dtype, name='decoder')(
                              x, features['low_level'], size, train=bn_train)
      logits = layers.conv(x, self.num_classes, self.logits_kernel_size, name='logits/semantic',
                           use_bias=True, dtype=self.dtype,
                           kernel_init=nn.initializers.truncated_normal(0.01))
    elif self.head == 'largefov':
      logits = heads.LargeFOV(self.num_classes, self.atrous_rates[0], self.head_hidden,
                              self.dropout_rate, self.dtype, name='largefov')(features['out'], train)
    else:
      logits = heads.ASPPL(self.num_classes, self.atrous_rates, self.head_hidden, self.dropout_rate,
                           self.dtype, name='aspp_l')(features['out'], train)
    logits = logits.astype(jnp.float32)
    self.sow('intermediates', 'logits_small', logits)
    return layers.resize_bilinear(logits, (height, width))


def _check(config, field, value, allowed):
  if value not in allowed:
    raise ValueError(f'config.model.{field}={value!r} is not one of {tuple(allowed)}.')


def create_model(model_config: ml_collections.ConfigDict, output_stride: int = None) -> DeepLab:
  """Builds DeepLab from `config.model`; `output_stride` overrides it and scales the atrous rates.

  Rates in the config are those at `config.model.output_stride` (the official recipes: 6/12/18 at OS16,
  12/24/36 at OS8), so evaluating an OS16-trained model at OS8 doubles them, as the official eval flags do.
  """
  m = model_config
  _check(m, 'backbone', m.backbone, BACKBONES)
  _check(m, 'head', m.head, HEADS)
  _check(m, 'output_stride', m.output_stride, OUTPUT_STRIDES)
  _check(m, 'depthwise_impl', m.depthwise_impl, layers.DEPTHWISE_IMPLS)
  _check(m, 'decoder_output_stride', m.decoder_output_stride, (0, 4, 8, 16))
  os_ = output_stride or m.output_stride
  _check(m, 'output_stride (override)', os_, OUTPUT_STRIDES)
  rates = tuple(int(round(r * m.output_stride / os_)) for r in m.atrous_rates)
  if m.head == 'largefov' and len(rates) != 1:
    raise ValueError(f'config.model.atrous_rates={tuple(m.atrous_rates)}: the largefov head takes one '
                     'rate (fc6, 12 at output stride 8).')
  if m.head == 'largefov' and m.backbone != 'vgg_16':
    raise ValueError('config.model.head=largefov is the VGG-16 DeepLab-v1 head: set backbone=vgg_16.')
  if m.backbone == 'vgg_16' and m.head == 'aspp' and m.decoder_output_stride:
    raise ValueError('vgg_16 has no decoder end point: set config.model.decoder_output_stride=0.')
  hidden = m.largefov_hidden if m.head == 'largefov' else m.aspp_l_hidden
  return DeepLab(
      backbone=m.backbone, head=m.head, num_classes=m.num_classes, output_stride=os_,
      atrous_rates=rates, multi_grid=tuple(m.multi_grid), depth_multiplier=m.depth_multiplier,
      aspp_with_separable_conv=m.aspp_with_separable_conv,
      aspp_with_image_pooling=m.aspp_with_image_pooling, aspp_filters=m.aspp_filters,
      decoder_output_stride=m.decoder_output_stride,
      decoder_use_separable_conv=m.decoder_use_separable_conv, decoder_filters=m.decoder_filters,
      logits_kernel_size=m.logits_kernel_size, head_hidden=hidden, dropout_rate=m.dropout_rate,
      fine_tune_batch_norm=m.fine_tune_batch_norm, bn_decay=m.bn_decay,
      depthwise_impl=m.depthwise_impl, dtype=layers.compute_dtype(m.dtype), remat=m.remat)
