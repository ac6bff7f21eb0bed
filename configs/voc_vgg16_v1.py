"""DeepLab-LargeFOV (V1) VGG-16 on PASCAL VOC 2012 (Chen et al., ICLR 2015).

pool4/pool5 stride 1 with conv5 at rate 2 (output stride 8), fc6 3x3 at rate 12 with 1024 channels, fc7 1x1
1024, dropout 0.5, fc8. Caffe protocol: batch 20, crop 321 here (16k+1), lr 0.001, weight decay 5e-4.
The fully-connected CRF post-processing of the paper is not part of this library yet.
"""
from configs import default


def get_config():
  config = default.get_config()
  m = config.model
  m.backbone = 'vgg_16'
  m.head = 'largefov'
  m.output_stride = 8
  m.atrous_rates = (12,)
  m.decoder_output_stride = 0
  m.dropout_rate = 0.5
  config.train.batch_size = 20
  config.train.crop_size = (321, 321)
  config.train.base_learning_rate = 0.001
  config.train.weight_decay = 5e-4
  config.train.num_steps = 6000
  config.eval.output_stride = 8
  return config
