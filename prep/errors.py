"""The one error type the CLIs turn into a single line and exit code 2."""


class PrepError(Exception):
    """Bad input or a bad argument: the message names the file or value and what is wrong."""
