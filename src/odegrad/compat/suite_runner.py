"""What the runners of a peer library's own test suite share (torchdiffeq_suite, torchsde_suite):
the command line, the per-unit progress line, the tally of units by status and the report
(printed, and written as JSON with --json).

A runner supplies `run(tests_dir, target, only, verbose) -> {"summary": ..., "units": ...}`,
whose summary comes from `summarise`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable


def log(line: str) -> None:
    """A progress line on stderr, stamped with the time of day (the runners' --verbose)."""
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def summarise(target: str, units: Iterable[tuple[str, str]], excluded, start: float) -> dict:
    """The summary of a run: `units` is (test name, status) per unit; counts by status, over all
    and per test name, what was excluded (as the runner records it) and the seconds since
    `start`."""
    counts: dict[str, int] = {}
    per_test: dict[str, dict[str, int]] = {}
    for test, status in units:
        counts[status] = counts.get(status, 0) + 1
        entry = per_test.setdefault(test, {})
        entry[status] = entry.get(status, 0) + 1
    return dict(target=target, units=sum(counts.values()), counts=counts, per_test=per_test,
                excluded=excluded, seconds=round(time.time() - start, 1))


def main(argv, *, description: str, run: Callable[..., dict], tests_help: str, only_help: str,
         verbose_help: str, n_excluded: Callable[[object], int]) -> None:
    """Parse the runner's command line, run the suite, write --json and print the counts per
    test and in all (`n_excluded` counts the summary's `excluded` entry)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("tests_dir", help=tests_help)
    parser.add_argument("--target", choices=("shim", "real"), default="shim")
    parser.add_argument("--json", help="write every unit's result here")
    parser.add_argument("--only", nargs="*", default=(), help=only_help)
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    args = parser.parse_args(argv)
    report = run(args.tests_dir, args.target, tuple(args.only), args.verbose)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1)
    summary = report["summary"]
    for test, counts in summary["per_test"].items():
        print(f"{test}: {counts}")
    print(f"target={summary['target']} units={summary['units']} {summary['counts']} "
          f"excluded={n_excluded(summary['excluded'])} ({summary['seconds']} s)")
