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

import sys
import time
import unittest
import warnings

from . import suite_runner

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
            suite_runner.log(test.id())

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
    summary = suite_runner.summarise(
        target, ((unit["test"], unit["status"]) for unit in result.units), excluded, start)
    return dict(summary=summary, units=result.units)


def main(argv=None) -> None:
    suite_runner.main(argv, description=__doc__.splitlines()[0], run=run,
                      tests_help="torchdiffeq's tests/ folder",
                      only_help="run the tests whose id has one",
                      verbose_help="print each test's start", n_excluded=len)


if __name__ == "__main__":
    main()
