"""--help: every config field's flag with its sentence, default and choices; each tool's examples; the usage line's
program; --print-config's YAML round trip through --config (issue 21, docs/cli.md "Help")."""

import re
from dataclasses import dataclass, fields

import pytest
import yaml

from twinray import command
from twinray.train.config import (
    CHOICES,
    METHOD_FIELDS,
    FinetuneConfig,
    PretrainConfig,
    flag,
    from_args,
    method_default,
    parser,
)
from twinray.train.methods import METHODS, NAMES, STUDY_BATCH


def run_help(capsys, *argv) -> str:
    """`twinray ARGV --help` in this process: its exit code is 0 and its stdout is returned."""
    assert command.main([*argv, "--help"]) == 0
    return capsys.readouterr().out


def entries(help_text: str) -> dict[str, str]:
    """Each option's help, whitespace collapsed, by its first flag: '--batch-size' -> '--batch-size BATCH_SIZE ...'."""
    options = help_text.split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    blocks = re.split(r"\n(?=  -)", options)
    return {b.split()[0].rstrip(","): " ".join(b.split()) for b in blocks}


@pytest.mark.parametrize("cls, name", [(PretrainConfig, "pretrain"), (FinetuneConfig, "finetune")])
def test_every_field_has_sentence_default_and_choices(capsys, cls, name):
    shown = entries(run_help(capsys, name))
    choices = CHOICES if cls is PretrainConfig else cls.CHOICES
    for f in fields(cls):
        text = shown[flag(f.name)]
        sentence = " ".join(f.metadata["help"].split())
        assert sentence and sentence in text, (f.name, text)
        if cls is PretrainConfig and f.name in METHOD_FIELDS:
            for method in METHODS:
                value = method_default(method, f.name, STUDY_BATCH)
                if value is not None:
                    expected = f"{method} {value:g}" if isinstance(value, float) else f"{method} {value}"
                    assert expected in text, (f.name, expected, text)
        elif f.name in getattr(cls, "REQUIRED", ()):
            assert text.endswith("(required)"), text
        else:
            default = f.metadata.get("shown", "none" if f.default is None else f.default)
            assert f"default: {' '.join(str(default).split())}" in text, (f.name, text)
        for choice in choices.get(f.name, ()):
            assert re.search(rf"choices: [^)]*\b{re.escape(str(choice))}\b", text), (f.name, choice, text)


def test_choices_named_in_help(capsys):
    shown = entries(run_help(capsys, "pretrain"))
    assert "choices: native, dali, ffcv)" in shown["--backend"]
    assert "choices: none, host, device, auto)" in shown["--cache"]
    assert f"choices: {', '.join(NAMES)})" in shown["--method"]  # the registry's names, in its order
    assert NAMES[0] == "barlow" and {"simclr", "moco", "byol", "vicreg"} <= set(NAMES)  # a new one may join
    assert "seed-final), base+OP+..." in shown["--recipe"]
    assert "default per method: moco 0.999, byol 0.996)" in shown["--momentum"]


def test_field_without_help_is_refused():
    @dataclass
    class Undocumented(PretrainConfig):
        extra: int = 0

    with pytest.raises(TypeError, match=r"Undocumented.extra has no help"):
        parser(Undocumented)


TOOLS = [
    ("prep",),
    *[("prep", sub) for sub in ("covid", "chexpert", "folder", "images", "sample", "all", "ffcv", "verify", "info")],
    ("pretrain",),
    ("finetune",),
    ("scan",),
    ("gradcam",),
    ("lr-find",),
    ("study-real",),
    ("audit",),
    ("preview",),
    ("export",),
    ("embed",),
    ("neighbours",),
]


@pytest.mark.parametrize("argv", TOOLS, ids=" ".join)
def test_help_ends_with_example_and_names_the_command(capsys, argv):
    text = run_help(capsys, *argv)
    name = "twinray " + " ".join(argv)
    assert text.startswith(f"usage: {name} "), text[:80]
    lines = text.rstrip().splitlines()
    assert "examples:" in lines
    assert lines[-1].startswith(f"  {name} --") or lines[-1].startswith(f"  {name} "), lines[-1]
    assert len(lines[-1].split()) > len(name.split()), lines[-1]  # the command and its arguments


def test_usage_names_python_m_when_run_so():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "prep", "--help"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("usage: python -m prep "), result.stdout[:80]
    assert result.stdout.rstrip().splitlines()[-1].startswith("  python -m prep ")


def test_print_config_round_trip_pretrain(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--method", "byol", "--batch-size", "64", "--epochs", "7", "--no-compile", "--out", str(out)]
    with pytest.raises(SystemExit) as done:
        from_args([*argv, "--print-config"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert not out.exists()  # --out untouched
    values = yaml.safe_load(printed)
    assert values["method"] == "byol" and values["momentum"] == 0.996 and values["predictor"] == "4096-256"
    assert values["lr"] == pytest.approx(0.1 * 64 / STUDY_BATCH) and values["lambd"] is None
    path = tmp_path / "resolved.yaml"
    path.write_text(printed)
    again, _ = from_args(["--config", str(path)])
    assert again == from_args(argv)[0]
    assert again.compile is False and again.epochs == 7 and again.batch_size == 64


def test_print_config_round_trip_finetune(tmp_path, capsys):
    given = tmp_path / "given.yaml"
    given.write_text("epochs: 3\nmode: linear\n")
    argv = ["--config", str(given), "--data", "data/packed/covid", "--init", "imagenet", "--out", str(tmp_path / "ft")]
    with pytest.raises(SystemExit) as done:
        from_args([*argv, "--fraction", "0.25", "--print-config"], FinetuneConfig)
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert not (tmp_path / "ft").exists()
    path = tmp_path / "resolved.yaml"
    path.write_text(printed)
    again, _ = from_args(["--config", str(path)], FinetuneConfig)
    assert again == from_args([*argv, "--fraction", "0.25"], FinetuneConfig)[0]
    assert (again.epochs, again.mode, again.fraction, again.lr) == (3, "linear", 0.25, 0.00153)


def test_print_config_through_twinray_exits_zero(tmp_path, capsys):
    assert command.main(["pretrain", "--method", "moco", "--out", str(tmp_path / "r"), "--print-config"]) == 0
    values = yaml.safe_load(capsys.readouterr().out)
    assert values["queue_size"] == 65536 and values["method"] == "moco"
    assert not (tmp_path / "r").exists()
