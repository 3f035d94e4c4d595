"""Batched augmentation on any device: one spec of ops (`SPEC`), per-sample parameters, functional kernels, and
recipes as data."""

from twinray.pipelines.augment.geometry import warp
from twinray.pipelines.augment.intensity import brightness_contrast, equalize, gaussian_blur, gaussian_noise
from twinray.pipelines.augment.ops import SPEC, Op
from twinray.pipelines.augment.pipeline import Augment, Params
from twinray.pipelines.augment.recipes import EVAL_RECIPE, FINETUNE_RECIPE, RECIPES, Recipe, load_recipe

__all__ = [
    "Augment",
    "EVAL_RECIPE",
    "FINETUNE_RECIPE",
    "Op",
    "Params",
    "RECIPES",
    "Recipe",
    "SPEC",
    "brightness_contrast",
    "equalize",
    "gaussian_blur",
    "gaussian_noise",
    "load_recipe",
    "warp",
]
