from __future__ import annotations

import cv2

from tests.conftest import assert_one_line_error, twinray_here
from twinray.pipelines.preview import HEADER, main


def test_preview_writes_originals_beside_views(covid_packed, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["--data", str(covid_packed), "--recipe", "base+vflip", "--out", str(out), "--n", "3"]) == 0
    grid = cv2.imread(str(out), cv2.IMREAD_GRAYSCALE)
    assert grid.shape == (3 * (224 + HEADER), 3 * 224)
    first_view = grid[HEADER : HEADER + 224, 224:448]
    assert first_view.std() > 10  # an image, not an empty tile
    assert "wrote" in capsys.readouterr().out


def test_preview_bad_recipe_is_one_line(covid_packed, tmp_path, capsys):
    args = ["--data", str(covid_packed), "--recipe", "base+sharpen", "--out", str(tmp_path / "g.png")]
    result = twinray_here(capsys, "preview", *args)
    assert_one_line_error(result, "preview: error:", "unknown recipe 'base+sharpen'")
