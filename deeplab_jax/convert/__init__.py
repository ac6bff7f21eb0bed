"""Importers for published DeepLab weights (official TF checkpoints, TFLite models)."""
