"""The usage line's program name and the examples that end each tool's --help (docs/cli.md, "Help")."""

from __future__ import annotations

import sys
from pathlib import Path


def program(command: str, module: str) -> str:
    """How the tool was started, for its usage line and its examples: `twinray COMMAND` under the twinray command
    (twinray/command.py sets sys.argv[0] to it), `python -m MODULE` when run so (`python -m prep`, `python -m
    twinray.train.pretrain`), `python SCRIPT` as typed when it ran as a script (`python train/pretrain.py`), and
    `twinray COMMAND` otherwise (its main() called from Python).

    command: the twinray subcommand ("pretrain", "prep"). module: the tool's module ("twinray.train.pretrain",
    "twinray.prep" for a package run by its __main__)."""
    if sys.argv and sys.argv[0] == f"twinray {command}":
        return sys.argv[0]
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    short = module.removeprefix("twinray.")
    if spec is not None:
        name = spec.name.removesuffix(".__main__")
        if name in (module, short):
            return f"python -m {name}"
    elif sys.argv and sys.argv[0] and getattr(main, "__file__", None):
        if Path(main.__file__).resolve().as_posix().endswith("/" + short.replace(".", "/") + ".py"):
            return f"python {sys.argv[0]}"
    return f"twinray {command}"


def examples(prog: str, *lines: str) -> str:
    """An --help epilog: "examples:" and one indented line per example, each `prog` and its arguments. Use it with
    a Raw*HelpFormatter, which keeps the lines as they are."""
    return "examples:\n" + "\n".join(f"  {prog} {line}" for line in lines)
