"""DeepLabV3 ResNet-101 on PASCAL VOC 2012: atrous ResNet (multi-grid 1,2,4), ASPP 6/12/18 + image pooling.

No decoder, plain (non-separable) 3x3 ASPP convs, OS16. The backbone is `resnet_v1_101_beta`, the variant
whose ImageNet checkpoint the official code publishes. Weight decay 1e-4 as the official ResNet recipes.
"""
from deeplab_jax.config_files import sibling

default = sibling(__file__, 'default')


def get_config():
  config = default.get_config()
  m = config.model
  m.backbone = 'resnet_v1_101_beta'
  m.multi_grid = (1, 2, 4)
  m.aspp_with_separable_conv = False
  m.decoder_output_stride = 0
  config.train.weight_decay = 1e-4
  return config
