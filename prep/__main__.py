from twinray.cli import run_cli
from twinray.prep.cli import main

run_cli(main)
