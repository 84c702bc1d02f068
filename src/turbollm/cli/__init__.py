"""The `turbollm` command: one module per subcommand (run, chat, serve, bench, fit, quality,
inspect), the flags they share in flags.py, the parser and dispatch in main.py."""

from turbollm.cli.main import main

__all__ = ["main"]
