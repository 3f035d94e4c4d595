"""The one error type the CLIs turn into a single line and exit code 2, the parser that does the same, and the
quiet exit for a reader that left (`... | head`)."""

import argparse
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


def run_cli(main: Callable[[], int]) -> NoReturn:
    """Every CLI's entry point: exits with `main()`'s code. When stdout's reader has gone (`... | head`), it says
    nothing more and exits as a shell expects (141) instead of printing a traceback. The CLIs save their work before
    they print about it, so this loses nothing."""
    try:
        code = main()
        sys.stdout.flush()  # a closed pipe shows up here, where it is handled, rather than at exit
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's own flush stays quiet
        code = SIGPIPE_EXIT
    sys.exit(code)
