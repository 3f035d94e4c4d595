"""Resolution-aware recipes (issue 19 s2): the pixel-valued parameters are stated at 224 px and scaled to the view
size; at 224 px every named recipe is exactly the study's (docs/augmentation.md, "Resolution")."""

import pytest

from twinray.pipelines import LoaderSettings, build_loader
from twinray.pipelines.augment import RECIPES, load_recipe


@pytest.mark.parametrize("name", list(RECIPES))
def test_at_224_every_named_recipe_is_unchanged(name):
    recipe = RECIPES[name]
    assert recipe.reference_size == 224
    assert recipe.at_size(224) == recipe.replace(size=224)
    study = load_recipe("seed-final").at_size(224)
    assert (study.blur_kernel, study.blur_sigma, study.crop_scale) == (23, (0.1, 2.0), (0.08, 1.0))


@pytest.mark.parametrize(
    "size, kernel, sigma",
    [
        (64, 7, (0.1 * 64 / 224, 2.0 * 64 / 224)),  # 23 x 64/224 = 6.57: the nearest odd integer is 7
        (96, 9, (0.1 * 96 / 224, 2.0 * 96 / 224)),  # 9.86 -> 9 (the odd integers nearest are 9 and 11)
        (128, 13, (0.1 * 128 / 224, 2.0 * 128 / 224)),  # 13.14 -> 13
        (32, 3, (0.1 * 32 / 224, 2.0 * 32 / 224)),  # 3.29 -> 3, never below 3
        (448, 47, (0.2, 4.0)),  # 46: 45 and 47 are equally near, and a tie goes up
    ],
)
def test_blur_follows_the_view_size(size, kernel, sigma):
    recipe = load_recipe("seed-final").at_size(size)
    assert recipe.size == size and recipe.blur_kernel == kernel
    assert recipe.blur_sigma == pytest.approx(sigma)
    assert recipe.crop_scale == (0.08, 1.0) and recipe.perspective_distortion == 0.15  # fractions stay


def test_a_recipe_without_reference_size_is_taken_as_given(tmp_path):
    path = tmp_path / "fixed.yaml"
    path.write_text("base: seed-final\nblur_kernel: 5\nblur_sigma: [0.2, 0.4]\nreference_size: null\n")
    recipe = load_recipe(path).at_size(64)
    assert (recipe.blur_kernel, recipe.blur_sigma, recipe.size) == (5, (0.2, 0.4), 64)


def test_the_loader_uses_the_recipe_at_its_size(covid_packed):
    loader = build_loader(str(covid_packed), LoaderSettings(batch_size=4, recipe="seed-final", size=48))
    try:
        assert loader.recipe.size == 48 and loader.recipe.blur_kernel == 5  # 23 x 48/224 = 4.93 -> 5
        assert loader.recipe.blur_sigma == pytest.approx((0.1 * 48 / 224, 2.0 * 48 / 224))
    finally:
        loader.close()


def test_config_json_records_the_recipe_as_it_ran(covid_packed, tmp_path):
    import json

    from tests.test_pretrain import TINY
    from twinray.train.pretrain import main

    out = tmp_path / "run"
    assert main(["--data", str(covid_packed), "--out", str(out), "--size", "32", "--max-steps", "1", *TINY]) == 0
    config = json.loads((out / "config.json").read_text())
    ran = config["recipe_effective"]
    assert config["parts"][-1]["recipe_effective"] == ran  # each part of the run records the recipe it ran
    assert ran["size"] == 32 and ran["blur_kernel"] == 3 and ran["reference_size"] == 224
    assert ran["blur_sigma"] == pytest.approx([0.1 * 32 / 224, 2.0 * 32 / 224])
    assert ran["name"] == "seed-final" and ran["crop_scale"] == [0.08, 1.0]
