"""Augmentation recipes as data: a dataclass, the study's named sets, and YAML for your own.

Every op but the crop has a probability. Names built from `base` plus `+op` tokens are recipes too, so each row of
the study's transform scans (tables 4 and 5) is a name: `base+vflip+equalize`, `base+blur+noise`, ...
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path

from twinray.config import check_fields, read_mapping
from twinray.pipelines.augment.ops import PROBABILITIES

# Each token of a recipe name switches on one op with the study's probability of 0.5: the spec's ops that have a
# probability, named with '-' for '_' (brightness-contrast).
TOKENS = {name.replace("_", "-"): name for name in PROBABILITIES}
STUDY_P = 0.5


@dataclass(frozen=True)
class Recipe:
    name: str = "custom"
    size: int = 224
    # RandomResizedCrop, always applied
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"  # the crop's filter (the study's), or bilinear
    # probabilities
    hflip: float = 0.5
    vflip: float = 0.0
    equalize: float = 0.0
    perspective: float = 0.0
    rotation: float = 0.0
    blur: float = 0.0
    noise: float = 0.0
    brightness_contrast: float = 0.0
    # parameters
    warp_interpolation: str = "bilinear"  # perspective and rotation: RandomPerspective's default, as in the study
    perspective_distortion: float = 0.15
    rotation_degrees: float = 20.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels at `reference_size`
    blur_kernel: int = 23  # pixels at `reference_size`: about 10% of the side, SimCLR's rule
    noise_mean_fraction: tuple[float, float] = (0.06, 0.1)  # sigma = image mean x U(a, b), as in the study
    noise_sigma: float | None = None  # a fixed sigma instead, on the [0, 1] scale
    brightness: float = 0.4  # factor drawn from [1 - b, 1 + b], as ColorJitter
    contrast: float = 0.4
    normalize: tuple[float, float] | None = None  # (mean, std); None as in the study
    # The side, in pixels, at which the pixel-valued parameters (blur_kernel, blur_sigma) are stated; `at_size`
    # scales them to the view size. None: taken as given at every size.
    reference_size: int | None = 224

    def __post_init__(self):
        problems = []
        for f in PROBABILITIES:
            p = getattr(self, f)
            if not 0.0 <= p <= 1.0:
                problems.append(f"{f}={p} is not a probability in [0, 1]")
        if self.size < 8:
            problems.append(f"size={self.size} is below 8")
        for f in ("interpolation", "warp_interpolation"):
            if getattr(self, f) not in ("bilinear", "bicubic"):
                problems.append(f"{f}={getattr(self, f)!r} is not bilinear or bicubic")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            problems.append(f"crop_scale={self.crop_scale} must satisfy 0 < low <= high <= 1")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            problems.append(f"crop_ratio={self.crop_ratio} must satisfy 0 < low <= high")
        if self.blur_kernel % 2 == 0 or self.blur_kernel < 1:
            problems.append(f"blur_kernel={self.blur_kernel} must be odd")
        if self.reference_size is not None and self.reference_size < 8:
            problems.append(f"reference_size={self.reference_size} is below 8")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            problems.append(f"blur_sigma={self.blur_sigma} must satisfy 0 < low <= high")
        if not 0 <= self.perspective_distortion <= 1:
            problems.append(f"perspective_distortion={self.perspective_distortion} is not in [0, 1]")
        if problems:
            raise ValueError(f"recipe {self.name!r}: " + "; ".join(problems))

    def replace(self, **changes) -> Recipe:
        return dataclasses.replace(self, **changes)

    def at_size(self, size: int) -> Recipe:
        """This recipe for views of `size` x `size` pixels, with its pixel-valued parameters scaled from
        `reference_size` (docs/augmentation.md, "Resolution"): blur_sigma x size / reference_size, and
        blur_kernel the odd integer nearest blur_kernel x size / reference_size (a tie goes up), at least 3.
        At reference_size (224 for every named recipe) nothing changes, so the study's seed-final at 224 px is
        exactly the study's. The rule keeps the blur the same share of the image at any size, as SimCLR's kernel
        of 10% of the side does; at 64 px seed-final blurs with a kernel of 7 and sigma in (0.029, 0.571) instead
        of 23 and (0.1, 2.0), which smeared most of a 64-px view. Fractions (crop scale, perspective), degrees and
        intensity factors need no scaling."""
        if self.reference_size is None or size == self.reference_size:
            return self.replace(size=size)
        factor = size / self.reference_size
        kernel = max(3, 2 * math.floor((self.blur_kernel * factor - 1) / 2 + 0.5) + 1)  # ties go up
        sigma = (self.blur_sigma[0] * factor, self.blur_sigma[1] * factor)
        return self.replace(size=size, blur_kernel=kernel, blur_sigma=sigma)

    def effective(self) -> dict:
        """The fields as the ops use them (after `at_size`), JSON-ready: what config.json records."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _from_tokens(name: str) -> Recipe:
    tokens = name.split("+")
    if tokens[0] != "base":
        raise KeyError(name)
    switched = {}
    for token in tokens[1:]:
        if token not in TOKENS:
            raise KeyError(name)
        switched[TOKENS[token]] = STUDY_P
    return Recipe(name=name, **switched)


SEED_FINAL = "base+vflip+equalize+perspective+blur+noise"

# The study's sets: the base, each row of the first scan (table 4), each row of the second (table 5),
# and the final set (all but rotation).
STUDY_RECIPES = [
    "base",
    "base+blur+noise",
    "base+equalize",
    "base+rotation",
    "base+brightness-contrast",
    "base+perspective",
    "base+vflip",
    "base+vflip+equalize",
    "base+vflip+equalize+perspective",
    SEED_FINAL,
    "base+vflip+equalize+perspective+blur+noise+rotation",
]
RECIPES: dict[str, Recipe] = {name: _from_tokens(name) for name in STUDY_RECIPES}
RECIPES["seed-final"] = RECIPES[SEED_FINAL].replace(name="seed-final")

# Downstream recipes, used by code rather than named on a command line (so not in RECIPES).
# Evaluation has no randomness: the whole image (a centre square for non-square ones), resized.
EVAL_RECIPE = Recipe(name="eval", crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0)
FINETUNE_RECIPE = EVAL_RECIPE.replace(name="finetune", hflip=0.5)  # the study's downstream augmentation


def load_recipe(name_or_path: str | Path, **overrides) -> Recipe:
    """A named recipe, a `base+op+...` name, or a YAML file of Recipe fields (which may start from `base: NAME`)."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")):
        path = Path(text)
        data = read_mapping(path, "recipe", error=ValueError)
        start = load_recipe(data.pop("base", "base"))
        name = data.pop("name", path.stem)
        check_fields(data, (f.name for f in fields(Recipe)), str(path), what="recipe field", error=ValueError)
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}  # YAML lists -> ranges
        return start.replace(name=name, **data, **overrides)
    recipe = RECIPES.get(text)
    if recipe is None:
        try:
            recipe = _from_tokens(text)
        except KeyError:
            choices = ", ".join(RECIPES)
            raise ValueError(
                f"unknown recipe {text!r}: use one of {choices}, a base+op name (ops: {', '.join(TOKENS)}), "
                "or a .yaml file"
            ) from None
    return recipe.replace(**overrides) if overrides else recipe
