"""Batched augmentation on any device: functional kernels, per-sample parameters, and recipes as data."""

from pipelines.augment.geometry import warp
from pipelines.augment.intensity import brightness_contrast, equalize, gaussian_blur, gaussian_noise
from pipelines.augment.pipeline import Augment, Params
from pipelines.augment.recipes import RECIPES, Recipe, load_recipe

__all__ = [
    "Augment",
    "Params",
    "RECIPES",
    "Recipe",
    "brightness_contrast",
    "equalize",
    "gaussian_blur",
    "gaussian_noise",
    "load_recipe",
    "warp",
]
