from twinray.prep.cli import main

from twinray.cli import run_cli

run_cli(main)
