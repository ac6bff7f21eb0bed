"""DeepLab models: backbones, heads and the assembled model."""
from deeplab_jax.models.deeplab import BACKBONES
from deeplab_jax.models.deeplab import create_model
from deeplab_jax.models.deeplab import DeepLab
from deeplab_jax.models.deeplab import HEADS
from deeplab_jax.models.deeplab import mean_pixel
from deeplab_jax.models.deeplab import preprocess

__all__ = ['BACKBONES', 'DeepLab', 'HEADS', 'create_model', 'mean_pixel', 'preprocess']
