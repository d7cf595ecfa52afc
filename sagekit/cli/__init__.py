"""The `sagekit` command line: typer commands only; the work lives in the modules they call.

Importing the command modules registers their commands on `app`.
"""

from sagekit.cli import chat, compress, run, serve, tools  # noqa: F401
from sagekit.cli.common import app

__all__ = ["app"]
