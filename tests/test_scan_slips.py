"""train/scan.py refuses every slip in its YAML before the first run starts, --dry-run too: one line naming the key
and the value, exit code 2, and no run directory made."""

from __future__ import annotations

import json

import pytest
import yaml

from twinray.cli import run_cli
from twinray.train.config import ConfigError
from twinray.train.scan import main


@pytest.fixture
def base(tmp_path) -> dict:
    """A scan that passes: a multiclass dataset's manifest (all the checks read of it), a random-init grid."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"task": "multiclass"}))
    (tmp_path / "no-backbone").mkdir()
    return {"data": str(data), "out": str(tmp_path / "out"), "seeds": [0, 1], "finetune": {"init": "random"},
            "grid": {"fraction": [0.5, 1.0]}, "metric": "accuracy"}  # fmt: skip


def scan_exit(tmp_path, cfg: dict, capsys, *flags: str) -> tuple[int, list[str]]:
    """`train/scan.py FILE FLAGS` in this process, through the CLI's own run_cli: (exit code, stderr lines)."""
    path = tmp_path / "scan.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        run_cli(lambda: main([str(path), *flags]), prog="scan", errors=(ConfigError,))
    return exit.value.code, capsys.readouterr().err.strip().splitlines()


def test_the_base_scan_passes_a_dry_run(base, tmp_path, capsys):
    assert scan_exit(tmp_path, base, capsys, "--dry-run") == (0, [])
    assert not (tmp_path / "out").exists()


SLIPS = [
    ("seeds not a list", {"seeds": 3}, "seeds 3 is not a non-empty list"),
    ("seed twice", {"seeds": [0, 0]}, "seeds [0, 0] lists 0 twice"),
    ("seed not a number", {"seeds": [0, "one"]}, "seeds [0, 'one']: 'one' is not a whole number"),
    ("seed a bool", {"seeds": [True]}, "seeds [True]: True is not a whole number"),
    ("seeds empty", {"seeds": []}, "seeds [] is not a non-empty list"),
    ("misspelt init", {"grid": {"init": ["imagenett"], "fraction": [1.0]}}, "init 'imagenett' is neither"),
    ("init not finished", {"finetune": {"init": "{tmp}/no-backbone"}}, "init '{tmp}/no-backbone' is neither"),
    ("init missing", {"finetune": {"init": "{tmp}/nowhere.safetensors"}}, "init '{tmp}/nowhere.safetensors'"),
    ("misspelt metric", {"metric": "acuracy"}, "metric 'acuracy' is not one of: accuracy"),
    ("metric of another task", {"metric": "mean_auroc"}, "metric 'mean_auroc': the multiclass dataset"),
    ("unknown key", {"sed": [1]}, "unknown key 'sed'"),
    ("unknown finetune field", {"finetune": {"init": "random", "epoch": 3}}, "unknown field 'epoch'"),
    ("finetune not a mapping", {"finetune": 3}, "finetune 3 is not a mapping"),
    ("wrong-typed nested value", {"finetune": {"init": "random", "epochs": "ten"}}, "epochs 'ten' is not an integer"),
    ("fraction out of range", {"grid": {"fraction": [0.0, 0.5]}}, "fraction 0.0 must be in (0, 1]"),
    ("fraction above 1", {"grid": {"fraction": [1.5]}}, "fraction 1.5 must be in (0, 1]"),
    ("fraction twice", {"grid": {"fraction": [0.1, 0.1]}}, "grid fraction [0.1, 0.1] lists 0.1 twice"),
    ("grid list empty", {"grid": {"fraction": []}}, "grid fraction []"),
    ("grid value a list", {"grid": {"fraction": [[0.1]]}}, "grid fraction [[0.1]]: [0.1] is not a single value"),
    ("grid not a mapping", {"grid": [0.1]}, "grid [0.1] is not a mapping"),
    ("seed in the grid", {"grid": {"seed": [1, 2]}}, "grid seed: set by the scan"),
    ("then a string", {"pretrain": {"epochs": 1}, "finetune": {}, "then": "linear"}, "then 'linear' is not a"),
    ("then twice", {"pretrain": {"epochs": 1}, "finetune": {}, "then": ["full", "full"]}, "lists 'full' twice"),
    ("bad mode", {"pretrain": {"epochs": 1}, "finetune": {}, "then": ["ful"]}, "'ful'"),
    ("init in a sweep", {"pretrain": {"epochs": 1}}, "init 'random': a pretraining sweep sets"),
    ("data not a path", {"data": 3}, "data 3 is not a path"),
]


@pytest.mark.parametrize("change, line", [(c, line) for _, c, line in SLIPS], ids=[s[0] for s in SLIPS])
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_each_slip_is_one_line_naming_key_and_value_before_any_run(base, tmp_path, capsys, change, line, dry_run):
    cfg = {**base, **json.loads(json.dumps(change).replace("{tmp}", str(tmp_path)))}
    code, lines = scan_exit(tmp_path, cfg, capsys, *(["--dry-run"] if dry_run else []))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("scan: error: ") and line.replace("{tmp}", str(tmp_path)) in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
