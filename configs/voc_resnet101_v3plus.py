"""DeepLabV3+ ResNet-101-beta on PASCAL VOC 2012: multi-grid (1,2,4), separable ASPP and decoder at stride 4."""
from deeplab_jax.config_files import sibling

voc_resnet101_v3 = sibling(__file__, 'voc_resnet101_v3')


def get_config():
  config = voc_resnet101_v3.get_config()
  config.model.aspp_with_separable_conv = True
  config.model.decoder_output_stride = 4
  return config
