"""`twinray`: one command for every tool, installed with the package ([project.scripts] in pyproject.toml).

    twinray prep covid --src ... --out data/packed/covid      # = python -m prep covid ...
    twinray pretrain --data data/packed/covid --out runs/bt   # = python train/pretrain.py ...
    twinray bench resources --device cpu ...                  # = python bench/resources.py ...
    twinray configs [NAME [--copy DIR]]                       # the shipped configs/*.yaml

Each subcommand is the `main()` its script runs, handed the rest of the command line: there is no second parser,
so flags, help and errors are the script's own. Errors are handled as the script's `__main__` block handles them
(`run_cli` with the same `prog` and error types): bad input is one line on stderr and exit code 2. Only the chosen
subcommand's module is imported, so `twinray --help` starts in well under a second. docs/cli.md lists them.
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import twinray
from twinray import __version__
from twinray.cli import InputError, OneLineParser, run_cli, say_error


@dataclass(frozen=True)
class Tool:
    """A subcommand: `module.main` run as the module's `__main__` block runs it, `run_cli(main, prog, errors)`.

    module: imported only when the subcommand is chosen. summary: its one sentence in `twinray --help`.
    prog, errors: the `__main__` block's run_cli arguments; `errors` by name, looked up in the module (then in
    builtins) once it is imported. tests/test_command.py checks them against each script's `__main__` block."""

    module: str
    summary: str
    prog: str | None = None
    errors: tuple[str, ...] = ()


TOOLS: dict[str, Tool] = {
    "prep": Tool("twinray.prep.cli", "Convert X-ray collections to the packed format, check and describe them."),
    "pretrain": Tool("twinray.train.pretrain",
                     "Self-supervised pretraining: Barlow Twins, SimCLR, MoCo v2, BYOL or VICReg."),
    "finetune": Tool("twinray.train.finetune", "Fine-tune or linear-probe a backbone with a label fraction.",
                     "finetune", ("ValueError", "FloatingPointError")),
    "scan": Tool("twinray.train.scan", "Grids of finetune or pretraining runs from a YAML file (see configs).",
                 "scan", ("ConfigError",)),
    "gradcam": Tool("twinray.train.gradcam", "Grad-CAM grids of fine-tuned models side by side.",
                    "gradcam", ("ValueError",)),
    "lr-find": Tool("twinray.train.lr_find", "LR range test for pretraining or fine-tuning.",
                    "lr_find", ("ValueError",)),
    "audit": Tool("twinray.train.audit", "Shortcut audit: how far cues that carry no disease predict the label.",
                  "audit"),
    "study-real": Tool("twinray.train.study_real", "The real-data label-efficiency study from one YAML file."),
    "preview": Tool("twinray.pipelines.preview", "Original images beside their augmented views, as one PNG.",
                    "preview", ("ValueError",)),
    "export": Tool("twinray.train.export", "A finished run's model as a timm folder or ONNX, with its preprocessing.",
                   "export"),
    "embed": Tool("twinray.train.embed", "Each image's embedding with its split, label and metadata, and a 2-D map.",
                  "embed"),
    "neighbours": Tool("twinray.train.neighbours", "An image's nearest images, and the cross-split near-duplicates.",
                       "neighbours"),
}  # fmt: skip

BENCHMARKS: dict[str, Tool] = {
    "augment_order": Tool("twinray.bench.augment_order", "Each augmentation order's distance from the study's list.",
                          "augment_order"),
    "ffcv_fields": Tool("twinray.bench.ffcv_fields", "FFCV storage: raw grey against RGBImageField.", "ffcv_fields"),
    "pipeline": Tool("twinray.bench.pipeline", "Two-view pairs per second for each loader backend.", "pipeline"),
    "prep_speed": Tool("twinray.bench.prep_speed", "`prep covid` against a naive PIL loop.", "prep_speed"),
    "resources": Tool("twinray.bench.resources", "Time and peak memory of a training step over a grid.", "resources"),
    "shard_check": Tool("twinray.bench.shard_check", "The shard cache's unchanged-file check against hashing.",
                        "shard_check"),
    "train_speed": Tool("twinray.bench.train_speed", "Images/s of pretrain's step and loop.", "train_speed"),
}  # fmt: skip

BUILTIN = {
    "bench": "Run a benchmark by name (`twinray bench --help` lists them).",
    "configs": "List the shipped YAML configs, print one, or copy it (--copy DIR).",
}


def usage(prog: str, tools: dict[str, Tool], extra: dict[str, str], what: str) -> str:
    """The help text: one line per subcommand, its name and its sentence."""
    rows = {**{name: tool.summary for name, tool in tools.items()}, **extra}
    width = max(map(len, rows))
    lines = [f"usage: {prog} {what.upper()} [ARGS ...]", "", f"{what}s (`{prog} {what.upper()} --help` for one):"]
    lines += [f"  {name:<{width}}  {summary}" for name, summary in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs `twinray ARGV` in this process and returns its exit code (0 done, 2 bad input, as each tool has it).

    An unknown or missing subcommand is one line on stderr ("twinray: error: ...") and 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    help_text = usage("twinray", TOOLS, BUILTIN, "command")
    if argv[:1] in (["-h"], ["--help"]):
        print(f"twinray {__version__}: self-supervised pretraining on chest X-rays (docs/cli.md)\n\n{help_text}")
        return 0
    if argv[:1] == ["--version"]:
        print(f"twinray {__version__}")
        return 0
    if not argv:
        return _bad("twinray", "a command is required: " + ", ".join([*TOOLS, *BUILTIN]))
    name, rest = argv[0], argv[1:]
    if name == "bench":
        return bench(rest)
    if name == "configs":
        return _run(lambda: configs(rest), "twinray configs", ())
    if name not in TOOLS:
        return _bad("twinray", f"unknown command {name!r}; choose from " + ", ".join([*TOOLS, *BUILTIN]))
    return call(f"twinray {name}", TOOLS[name], rest)


def bench(argv: list[str]) -> int:
    """`twinray bench NAME ARGS`: bench/NAME.py's main with ARGS."""
    if argv[:1] in (["-h"], ["--help"]):
        print(usage("twinray bench", BENCHMARKS, {}, "benchmark"))
        return 0
    if not argv or argv[0] not in BENCHMARKS:
        what = f"unknown benchmark {argv[0]!r}" if argv else "a benchmark is required"
        return _bad("twinray bench", f"{what}; choose from " + ", ".join(BENCHMARKS))
    return call(f"twinray bench {argv[0]}", BENCHMARKS[argv[0]], argv[1:])


def call(name: str, tool: Tool, argv: list[str]) -> int:
    """Imports `tool.module` and runs its `main` on `argv` as its `__main__` block does; returns the exit code.

    sys.argv is [name, *argv] meanwhile: a parser without its own `prog` shows `name` in its usage line, and the
    benchmarks' `main()`, which takes no arguments, parses it."""
    module = importlib.import_module(tool.module)
    errors = tuple(getattr(module, e, None) or getattr(builtins, e) for e in tool.errors)
    takes_argv = bool(inspect.signature(module.main).parameters)
    saved, sys.argv = sys.argv, [name, *argv]
    try:
        return _run(lambda: module.main(argv) if takes_argv else module.main(), tool.prog, errors)
    finally:
        sys.argv = saved


def _run(main, prog: str | None, errors: tuple[type[Exception], ...]) -> int:
    """twinray.cli.run_cli's handling (one-line errors, a full disk, a closed pipe), with its exit code returned
    instead of exiting. A SystemExit from inside (argparse's --help and errors, `sys.exit(message)`) is returned the
    same way; a message is written to stderr first, as the interpreter would."""
    try:
        run_cli(lambda: main() or 0, prog, errors)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        sys.stderr.write(f"{e.code}\n")
        return 1
    raise AssertionError("run_cli returned")  # pragma: no cover (it always exits)


def _bad(prog: str, message: str) -> int:
    say_error(prog, f"{message} (see --help)")
    return 2


# ---- `twinray configs`: the YAML files shipped in the package --------------------------------------------------


def configs_dir() -> Path:
    """The folder of the shipped YAML configs: twinray/configs/ in an installed wheel, the repository's configs/ in
    a checkout (where the package's search path includes the repository root, twinray/__init__.py)."""
    for root in twinray.__path__:
        if (Path(root) / "configs").is_dir():
            return Path(root) / "configs"
    raise InputError("no configs folder found beside the twinray package (a broken install?)")


def find_config(name: str) -> Path:
    """The shipped config NAME (with or without .yaml). Raises InputError naming it and the known ones."""
    path = configs_dir() / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not path.is_file() or path.parent != configs_dir():
        known = ", ".join(p.stem for p in sorted(configs_dir().glob("*.yaml")))
        raise InputError(f"no shipped config {name!r}; there are: {known}")
    return path


def describe(path: Path) -> str:
    """A config's first comment line, without the '#'."""
    first = path.read_text().splitlines()[:1]
    return first[0].lstrip("#").strip() if first and first[0].startswith("#") else ""


def configs(argv: list[str]) -> int:
    """`twinray configs`: lists them; `twinray configs NAME`: prints one; `--copy DIR` writes DIR/NAME.yaml (an
    existing file is kept unless --force)."""
    parser = OneLineParser(prog="twinray configs", description=configs.__doc__)
    parser.add_argument("name", nargs="?", help="a config's name (demo-scan or demo-scan.yaml)")
    parser.add_argument("--copy", type=Path, metavar="DIR", help="write DIR/NAME.yaml instead of printing it")
    parser.add_argument("--force", action="store_true", help="with --copy: replace an existing DIR/NAME.yaml")
    args = parser.parse_args(argv)
    if args.name is None:
        if args.copy:
            parser.error("--copy needs a NAME")
        paths = sorted(configs_dir().glob("*.yaml"))
        width = max(len(p.stem) for p in paths)
        print("\n".join(f"{p.stem:<{width}}  {describe(p)}" for p in paths))
        return 0
    path = find_config(args.name)
    if args.copy is None:
        sys.stdout.write(path.read_text())
        return 0
    if args.copy.exists() and not args.copy.is_dir():
        raise InputError(f"{args.copy} is not a folder")
    target = args.copy / path.name
    if target.exists() and not args.force:
        raise InputError(f"{target} exists; pass --force to replace it")
    args.copy.mkdir(parents=True, exist_ok=True)
    from twinray.atomic import atomic  # lazy: `twinray` imports twinray.cli only (tests/test_command.py)

    with atomic(target) as tmp:
        shutil.copyfile(path, tmp)
    print(f"wrote {target}")
    return 0


def cli() -> None:
    """The console script's entry point ([project.scripts] twinray)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
