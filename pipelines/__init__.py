"""Loaders and batched GPU augmentation over the packed format (built in the pipelines issue)."""
