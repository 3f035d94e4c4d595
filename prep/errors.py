"""The one error type the CLIs turn into a single line and exit code 2, and the parser that does the same."""

import argparse


class PrepError(Exception):
    """Bad input or a bad argument: the message names the file or value and what is wrong."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (exit code 2) instead of the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
