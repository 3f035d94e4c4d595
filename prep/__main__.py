from prep.cli import main
from prep.errors import run_cli

run_cli(main)
