"""Run torchdiffeq's own test suite against odegrad.compat.torchdiffeq, counting subtests.

    python -m odegrad.compat.torchdiffeq_suite TESTS_DIR [--target shim|real] [--json OUT]
                                                [--only NAME ...]

TESTS_DIR is the tests/ folder of torchdiffeq's repository at the release compared against
(0.2.5: commit a88aac5; the PyPI sdist ships no tests). With --target shim (the default),
`import torchdiffeq` in those tests resolves to odegrad.compat.torchdiffeq; with --target real,
to the installed torchdiffeq. The unit counted is a subTest; a test that uses none counts as one
unit, and an error raised outside any subTest of a test that has subtests as one more failed
unit. docs/torchdiffeq_suite.md has the commands, the counts and the exclusions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import unittest
import warnings

# The modules of tests/run_all.py (DETEST/ is a benchmark, not a test).
MODULES = ("api_tests", "event_tests", "gradient_tests", "norm_tests", "odeint_tests")

# Tests that read torchdiffeq's internals rather than its API, with the reason.
EXCLUDED = {
    "norm_tests.TestNorms.test_adjoint_norm": (
        "reads xs.grad_fn.adjoint_options['norm'], an attribute of the autograd node of "
        "torchdiffeq's OdeintAdjointMethod, and replaces it: internals, not API (its last two "
        "parts, a callable adjoint_options['norm'], raise in the shim by design)"
    ),
}


class _Result(unittest.TestResult):
    """Collects one record per unit: test id, subtest description, status, message."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.units: list[dict] = []
        self.verbose = verbose
        self._with_subtests: set[str] = set()
        self._start = 0.0

    def startTest(self, test):  # noqa: N802 (unittest's name)
        super().startTest(test)
        self._start = time.time()
        if self.verbose:
            print(f"[{time.strftime('%H:%M:%S')}] {test.id()}", file=sys.stderr, flush=True)

    @staticmethod
    def _message(test, err) -> tuple[str, str]:
        if err is None:
            return "pass", ""
        status = "fail" if issubclass(err[0], test.failureException) else "error"
        return status, f"{err[0].__name__}: {str(err[1])[:300]}"

    def addSubTest(self, test, subtest, err):  # noqa: N802
        super().addSubTest(test, subtest, err)
        self._with_subtests.add(test.id())
        status, message = self._message(test, err)
        self.units.append(dict(test=test.id(), sub=subtest._subDescription(), status=status,
                               message=message))

    def _whole(self, test, err):
        status, message = self._message(test, err)
        has_subtests = test.id() in self._with_subtests
        if has_subtests and status == "pass":
            return
        self.units.append(dict(test=test.id(), sub="(outside subTest)" if has_subtests else "",
                               status=status, message=message,
                               seconds=round(time.time() - self._start, 2)))

    def addSuccess(self, test):  # noqa: N802
        super().addSuccess(test)
        self._whole(test, None)

    def addFailure(self, test, err):  # noqa: N802
        super().addFailure(test, err)
        self._whole(test, err)

    def addError(self, test, err):  # noqa: N802
        super().addError(test, err)
        self._whole(test, err)

    def addSkip(self, test, reason):  # noqa: N802
        super().addSkip(test, reason)
        self.units.append(dict(test=test.id(), sub="", status="skip", message=reason))


def run(tests_dir: str, target: str = "shim", only: tuple[str, ...] = (),
        verbose: bool = False) -> dict:
    """Run the suite; returns {"summary": ..., "units": [...]}."""
    sys.path.insert(0, tests_dir)
    if target == "shim":
        from . import torchdiffeq as shim

        sys.modules["torchdiffeq"] = shim
    else:
        import torchdiffeq  # noqa: F401

    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    excluded = []
    for name in MODULES:
        for case in loader.loadTestsFromName(name):
            for test in case:
                if test.id() in EXCLUDED:
                    excluded.append(dict(test=test.id(), reason=EXCLUDED[test.id()]))
                elif not only or any(o in test.id() for o in only):
                    suite.addTest(test)
    result = _Result(verbose)
    start = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        suite.run(result)
    counts: dict[str, int] = {}
    per_test: dict[str, dict[str, int]] = {}
    for unit in result.units:
        counts[unit["status"]] = counts.get(unit["status"], 0) + 1
        entry = per_test.setdefault(unit["test"], {})
        entry[unit["status"]] = entry.get(unit["status"], 0) + 1
    summary = dict(target=target, units=sum(counts.values()), counts=counts, per_test=per_test,
                   excluded=excluded, seconds=round(time.time() - start, 1))
    return dict(summary=summary, units=result.units)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tests_dir", help="torchdiffeq's tests/ folder")
    parser.add_argument("--target", choices=("shim", "real"), default="shim")
    parser.add_argument("--json", help="write every unit's result here")
    parser.add_argument("--only", nargs="*", default=(), help="run the tests whose id has one")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each test's start")
    args = parser.parse_args(argv)
    report = run(args.tests_dir, args.target, tuple(args.only), args.verbose)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1)
    summary = report["summary"]
    for test, counts in summary["per_test"].items():
        print(f"{test}: {counts}")
    print(f"target={summary['target']} units={summary['units']} {summary['counts']} "
          f"excluded={len(summary['excluded'])} ({summary['seconds']} s)")


if __name__ == "__main__":
    main()
