"""deeplab_jax: the DeepLab family (V1, V2, V3, V3+) in JAX/Flax."""

__version__ = "0.1.0"
