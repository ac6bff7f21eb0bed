"""DeepLab-LargeFOV (V1) VGG-16 on PASCAL VOC 2012 (Chen et al., ICLR 2015).

pool4/pool5 stride 1 with conv5 at rate 2 (output stride 8), fc6 3x3 at rate 12 with 1024 channels, fc7 1x1
1024, dropout 0.5, fc8. Caffe protocol: batch 20, crop 321 here (16k+1), lr 0.001, weight decay 5e-4.
Evaluation applies the paper's fully-connected CRF (w1=4, theta_alpha=121, theta_beta=5, w2=3, theta_gamma=3,
10 iterations; `--config.eval.crf.enabled=False` for the network alone).
"""
from deeplab_jax.config_files import sibling

default = sibling(__file__, 'default')


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
  crf = config.eval.crf
  crf.enabled = True
  crf.w1, crf.theta_alpha, crf.theta_beta, crf.w2, crf.theta_gamma = 4.0, 121.0, 5.0, 3.0, 3.0
  return config
