"""CLI commands, one module each.  Importing a module registers its command on repq.cli.app."""
