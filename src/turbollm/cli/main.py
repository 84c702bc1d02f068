"""Command line: `turbollm run | chat | serve | bench | fit | quality | inspect`.

Each subcommand is a module of this package: it adds its parser (`add_parser`), parses its
flags into frozen dataclasses (the run's settings always into one RunConfig, cli/flags.py) and
hands them to one function. Errors caused by input are printed as one line (`error: ...`)
with exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from turbollm.cli import bench, chat, fit, inspect, quality, run, serve
from turbollm.errors import TurbollmError

COMMANDS = (run, bench, quality, chat, serve, fit, inspect)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turbollm", description="Local inference for Gemma GGUF models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except TurbollmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # invalid settings (SamplingParams and friends say what to change)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `turbollm inspect | head`: the reader is gone, stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
