"""docs/methods.md's tables and its "Sources" section, written from the registry (train/methods/__init__.py
METHODS): a test keeps the page equal to them, so the page cannot drift from the code."""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

from twinray.cli import run_cli
from twinray.train.methods import METHODS, SETTINGS, STUDY_BATCH
from twinray.train.methods.spec import MethodSpec

ROOT = Path(__file__).resolve().parents[1]  # train/


def methods_table() -> str:
    """Each method's module, loss (with its file) and model pieces, as a Markdown table."""
    lines = ["| `--method` | Objective | Module | Loss (file) | Model pieces |", "|---|---|---|---|---|"]
    for key, m in METHODS.items():
        loss = f"`{m.loss.__name__}` ({_file(m.loss)})"
        lines.append(f"| `{key}` | {m.name} | {_file(m.method)} | {loss} | {m.pieces} |")
    return "\n".join(lines) + "\n"


def defaults_table(batch: int = STUDY_BATCH) -> str:
    """The defaults as a Markdown table: the fields every method has, a row per setting with a row label
    (Setting.row), the loss coefficients; '-' where a method has no such field."""
    rows = [("projector", lambda m: m.projector + ("" if m.projector_batch_norm else " (no BN)"))]
    rows += [(s.row, lambda m, name=name: _setting(m, name)) for name, s in SETTINGS.items() if s.row]
    rows += [
        ("optimizer", lambda m: m.optimizer),
        (f"lr at batch {batch}", lambda m: f"{m.lr(batch):.4g}" + _rule(m)),
        ("weight decay", lambda m: f"{m.weight_decay:g}"),
        ("schedule", lambda m: f"{m.schedule}, {m.warmup_epochs:g} warm-up epochs"),
        ("loss coefficients", lambda m: ", ".join(f"{k} {v:g}" for k, v in m.coefficients.items()) or "-"),
    ]
    keys = list(METHODS)
    lines = ["| | " + " | ".join(f"`{k}` ({METHODS[k].name})" for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(fn(METHODS[k]) for k in keys) + " |" for label, fn in rows]
    return "\n".join(lines) + "\n"


def sources_text() -> str:
    """docs/methods.md's "Sources" section: each method's heading and paper, then a bullet per field of
    MethodSpec.sources ('*': all fields), wrapped at 118 characters."""
    out = []
    for key, m in METHODS.items():
        out.append(f"### `{key}`: {m.name} ({m.paper})\n")
        for name, text in m.sources.items():
            bullet = f"- **{'all fields' if name == '*' else name}**: {text}."
            wrapped = textwrap.fill(bullet, 118, subsequent_indent="  ", break_on_hyphens=False, break_long_words=False)
            out.append(wrapped)
        out.append("")
    return "\n".join(out)


def _setting(m: MethodSpec, name: str) -> str:
    s = m.setting(name)
    if s is None:
        return "-"
    value = f"{s.default:g}" if isinstance(s.default, (int, float)) else str(s.default)
    return f"{value} ({s.note})" if s.note else value


def _rule(m: MethodSpec) -> str:
    return f" ({m.base_lr:g} x B/{m.base_batch})" if m.lr_scaling == "linear" else ""


def _file(obj) -> str:
    """Where `obj` is defined, as the repository path (train/...)."""
    return "train/" + Path(inspect.getfile(obj)).resolve().relative_to(ROOT).as_posix()


def main() -> int:
    """`python -m twinray.train.methods.table`: the three blocks of docs/methods.md that come from the registry,
    each under a line that says where it goes."""
    print("<!-- docs/methods.md, the table at the top -->\n" + methods_table())
    print("\n<!-- docs/methods.md, under '## Defaults' -->\n" + defaults_table())
    print("\n<!-- docs/methods.md, under '## Sources' -->\n" + sources_text())
    return 0


if __name__ == "__main__":
    run_cli(main)
