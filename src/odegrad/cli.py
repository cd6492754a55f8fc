"""The command line: `odegrad compare`, `odegrad train MODEL`, `odegrad demo`.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args)`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

_SUBCOMMANDS = {
    "compare": ("odegrad.compare", "every gradient method side by side on a neural ODE"),
    "train": ("odegrad.train", "train a model: classifier, cnf, latent, cde or sde"),
    "demo": ("odegrad.demo", "a short solve with its statistics"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="odegrad", description="Neural ODEs with exact, memory-bounded gradients."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in _SUBCOMMANDS.items():
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
