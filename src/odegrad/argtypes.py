"""Argument types and output-path checks shared by the `odegrad` subcommands.

Each type turns bad text into an `argparse.ArgumentTypeError`, which argparse reports as
`odegrad ...: error: argument --X: <message>` with exit status 2. The path checks return why a
path cannot be written (or None), so that a command refuses an unwritable output before a long
run rather than failing after it.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

SEED_MAX = 2**63 - 1  # torch's generators take seeds up to 2**64 - 1; the ranks' offsets fit


def _integer(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    value = _integer(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _integer(text, "a non-negative integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def int_at_least(minimum: int) -> Callable[[str], int]:
    """The type of an integer option that must be at least `minimum`."""

    def parse(text: str) -> int:
        value = _integer(text, f"an integer of at least {minimum}")
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"expected an integer of at least {minimum}, got {value}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


def seed(text: str) -> int:
    """A seed for torch's generators: an integer in [0, 2**63 - 1]."""
    value = _integer(text, "an integer seed")
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**63 - 1], got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, "a positive number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, "a finite non-negative number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite non-negative number, got {text}")
    return value


def fraction(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    """Comma-separated positive integers."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def checkpoints(text: str) -> str | int:
    """"all", "solution" or a positive int (a binomial checkpoint budget)."""
    if text in ("all", "solution"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'all', 'solution' or a positive integer budget, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"the checkpoint budget must be positive, got {value}")
    return value


def option(text: str) -> tuple[str, object]:
    """KEY=VALUE, VALUE read as int, float, true/false or else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    value: object = raw
    if raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    else:
        for kind in (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                continue
    return key, value


def non_empty_path(text: str) -> Path:
    """A path; the empty string is refused (Path("") would silently mean the current folder)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return Path(text)


# ---- output paths ----------------------------------------------------------------------------


def _writable_dir(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def output_file_problem(path: str | os.PathLike) -> str | None:
    """Why a file cannot be written at `path` (without writing anything), or None."""
    text = os.fspath(path)
    if not text:
        return "the path is empty"
    if text.endswith(os.sep) or (os.altsep and text.endswith(os.altsep)):
        return "the path names a folder, not a file"
    target = Path(text)
    try:
        if target.is_dir():
            return "it is a directory"
        folder = target.parent
        if not folder.exists():
            return f"the directory {folder} does not exist"
        if not folder.is_dir():
            return f"{folder} is not a directory"
        if target.exists():
            if not os.access(target, os.W_OK):
                return "the file is not writable"
        elif not _writable_dir(folder):
            return f"the directory {folder} is not writable"
    except OSError as error:
        return f"cannot be checked: {error.strerror or error}"
    return None


def output_dir_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be (created as) a folder to write files in, or None."""
    text = os.fspath(path)
    if not text:
        return "the path is empty"
    target = Path(text)
    try:
        if target.exists():
            if not target.is_dir():
                return "it exists and is not a directory"
            if not _writable_dir(target):
                return "the directory is not writable"
            return None
        ancestor = target.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            return f"{ancestor} is not a directory"
        if not _writable_dir(ancestor):
            return f"cannot create it: the directory {ancestor} is not writable"
    except OSError as error:
        return f"cannot be checked: {error.strerror or error}"
    return None
