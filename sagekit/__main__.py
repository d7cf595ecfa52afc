"""`python -m sagekit` runs the command line, like the `sagekit` script."""

from sagekit.cli import app

app(prog_name="sagekit")
