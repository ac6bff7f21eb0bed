"""DeepLab models: backbones (registered in `backbones`), heads and the assembled model."""
from deeplab_jax.models import backbones
from deeplab_jax.models.deeplab import backbone_scope
from deeplab_jax.models.deeplab import backbone_spec
from deeplab_jax.models.deeplab import create_model
from deeplab_jax.models.deeplab import DeepLab
from deeplab_jax.models.deeplab import HEADS
from deeplab_jax.models.deeplab import mean_pixel
from deeplab_jax.models.deeplab import validate_model_config

__all__ = ['DeepLab', 'HEADS', 'backbone_scope', 'backbone_spec', 'backbones', 'create_model', 'mean_pixel',
           'validate_model_config']
