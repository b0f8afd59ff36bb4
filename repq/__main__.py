"""`python -m repq` runs the CLI (where the console script is not installed)."""

from .cli import app

app()
