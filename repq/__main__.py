"""`python -m repq` runs the CLI (where the console script is not installed)."""

if __name__ == "__main__":   # not when a spawned worker process re-imports the main module
    from .cli import app

    app()
