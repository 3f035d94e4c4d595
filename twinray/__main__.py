"""`python -m twinray ...`: the same as the `twinray` command (twinray/command.py)."""

from twinray.command import cli

cli()
