"""The one error type the CLIs turn into a single line and exit code 2, the parser that does the same, the line for
a full disk, and the quiet exit for a reader that left (`... | head`)."""

import argparse
import errno
import math
import os
import sys
from collections.abc import Callable
from typing import NoReturn

SIGPIPE_EXIT = 141  # what a shell reports for a program killed by SIGPIPE


class InputError(Exception):
    """Bad input or a bad argument: the message names the file or value and what is wrong."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (exit code 2) instead of the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_list(text: str) -> list[int]:
    """argparse type for a comma-separated list of positive integers ("128,224"); a bad entry is a one-line error
    naming it."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every entry must be at least 1")
    return values


def _number(text: str, convert, noun: str, ok, rule: str):
    """`convert(text)` when it parses and passes `ok`; else an argparse error naming the text: "'x' is not
    NOUN" or "'x' RULE"."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{text!r} {rule}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1; else a one-line error naming the text."""
    return _number(text, int, "an integer", lambda v: v >= 1, "must be at least 1")


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0; else a one-line error naming the text."""
    return _number(text, float, "a number", lambda v: math.isfinite(v) and v > 0, "must be a finite number above 0")


def pixel_count(text: str) -> int:
    """A pixel count: an integer, in scientific notation too (`2e8`)."""
    whole = _number(
        text,
        float,
        "a number",
        lambda v: math.isfinite(v) and v >= 1 and v == int(v),
        "must be a whole number of pixels, at least 1",
    )
    return int(whole)


def say_error(prog: str, message: str) -> None:
    """Writes "PROG: error: MESSAGE" and its newline to stderr in one write. Python's stderr writes through, so
    print() would write the message and the newline separately, and the lines of two processes sharing a stderr (two
    ranks under torchrun) could run into one."""
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.stderr.flush()


DISK_FULL = {errno.ENOSPC: "ENOSPC", errno.EDQUOT: "EDQUOT: the disk quota is used up"}


def disk_full(error: BaseException) -> bool:
    """Whether `error` is an OSError for a full disk or an exhausted quota (ENOSPC, EDQUOT)."""
    return isinstance(error, OSError) and error.errno in DISK_FULL


def disk_full_message(error: OSError) -> str:
    """ "PATH: no space left on the device (...)" for a disk_full error; PATH is the error's file name (writers that
    know only the folder they write into attach it: twinray.atomic.naming)."""
    where = error.filename if error.filename is not None else "the output"
    return f"{where}: no space left on the device ({DISK_FULL[error.errno]}): free some space there or write elsewhere"


def _program_name() -> str:
    """The running program's name for a line with no `prog`: `pretrain` for train/pretrain.py, `prep` for
    `python -m prep`."""
    path = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.basename(os.path.dirname(path)) if stem == "__main__" else stem


def run_cli(main: Callable[[], int], prog: str | None = None, errors: tuple[type[Exception], ...] = ()) -> NoReturn:
    """Every CLI's entry point: exits with `main()`'s code.

    With `prog`, an InputError (or one of `errors`, such as ValueError for a library that names the bad value) that
    reaches here becomes one line, "PROG: error: MESSAGE", on stderr and exit code 2, never a traceback. When
    stdout's reader has gone (`... | head`), it says nothing more and exits as a shell expects (141) instead of
    printing a traceback. The CLIs save their work before they print about it, so this loses nothing.

    A full disk (OSError ENOSPC or EDQUOT), with or without `prog`, is one line naming the path and exit code 2:
    "PROG: error: PATH: no space left on the device (ENOSPC): ...". Outputs are written atomically (twinray.atomic,
    prep's temporary folder), so what was there before is intact and nothing half-written is published."""
    caught = (InputError, *errors) if prog else ()
    try:
        try:
            code = main()
        except caught as e:
            say_error(prog, str(e))
            code = 2
        except OSError as e:
            if not disk_full(e):
                raise
            say_error(prog or _program_name(), disk_full_message(e))
            code = 2
        sys.stdout.flush()  # a closed pipe shows up here, where it is handled, rather than at exit
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's own flush stays quiet
        code = SIGPIPE_EXIT
    sys.exit(code)
