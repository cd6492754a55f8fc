"""Run torchsde's own test suite against odegrad.compat.torchsde, counting parametrised tests.

    python -m odegrad.compat.torchsde_suite TESTS_DIR [--target shim|real] [--json OUT]
                                             [--only NAME ...] [-v]

TESTS_DIR is the tests/ folder of torchsde's repository at the release compared against (tag
v0.2.6; the PyPI sdist ships tests/ without their problems.py and utils.py). With --target shim
(the default), `import torchsde` (and `torchsde.settings`, `torchsde.types`, which the tests
import) resolves to odegrad.compat.torchsde; with --target real, to the installed torchsde.

The unit counted is one parametrised test id. Each gets one status:
    pass     the test passed;
    refused  it raised odegrad's UnsupportedCombinationError or UnknownNameError: the shim
             refuses, by name, an option or method odegrad lacks;
    wrong    an assertion failed (a number or a shape differs from what the test expects);
    failed   any other exception (a bug of the shim, or a missing-feature error of another kind);
    skip     the test skipped itself (CUDA tests without a GPU).
docs/torchsde_suite.md has the commands, the counts and the exclusions.
"""

from __future__ import annotations

import sys
import time

import pytest

from . import suite_runner

MODULES = ("test_adjoint.py", "test_brownian_interval.py", "test_brownian_path.py",
           "test_brownian_tree.py", "test_sdeint.py")

# Left out, with the reason: test ids containing the key.
EXCLUDED: dict[str, str] = {
    "device1": (
        "the CUDA parametrisations of the Brownian tests: without a GPU they call "
        "pytest.skip(msg=...), a keyword pytest 8 no longer takes, so they raise TypeError "
        "before testing anything, against torchsde itself as against the shim"),
}


class _Collector:
    """A pytest plugin that keeps one record per test id."""

    def __init__(self, verbose: bool):
        self.units: dict[str, dict] = {}
        self.excluded: list[str] = []
        self.verbose = verbose

    def pytest_collection_modifyitems(self, config, items):
        kept, dropped = [], []
        for item in items:
            (dropped if any(key in item.nodeid for key in EXCLUDED) else kept).append(item)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = kept
        self.excluded = [item.nodeid for item in dropped]

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        report = outcome.get_result()
        if report.when == "call" or (report.when == "setup" and not report.passed):
            self.units[item.nodeid] = _classify(report, call)
            if self.verbose:
                suite_runner.log(f"{item.nodeid}: {self.units[item.nodeid]['status']}")


def _classify(report, call) -> dict:
    from odegrad.errors import UnknownNameError, UnsupportedCombinationError

    if report.skipped:
        return dict(status="skip", message=str(report.longrepr)[-200:])
    if report.passed:
        return dict(status="pass", message="")
    excinfo = call.excinfo
    error = excinfo.value if excinfo is not None else None
    if isinstance(error, (UnsupportedCombinationError, UnknownNameError)):
        status = "refused"
    elif isinstance(error, AssertionError):
        status = "wrong"
    else:
        status = "failed"
    kind = type(error).__name__ if error is not None else "?"
    return dict(status=status, message=f"{kind}: {str(error)[:300]}")


def _point_at_shim() -> None:
    from . import torchsde as shim

    sys.modules["torchsde"] = shim
    sys.modules["torchsde.settings"] = shim.settings
    sys.modules["torchsde.types"] = shim.types


def run(tests_dir: str, target: str = "shim", only: tuple[str, ...] = (),
        verbose: bool = False) -> dict:
    """Run the suite; returns {"summary": ..., "units": {test id: record}}."""
    if target == "shim":
        _point_at_shim()
    tests_dir = tests_dir.rstrip("/")
    args = [f"{tests_dir}/{m}" for m in MODULES]
    args += ["-q", "-p", "no:cacheprovider", "-W", "ignore"]
    if only:
        args += ["-k", " or ".join(only)]
    collector = _Collector(verbose)
    start = time.time()
    pytest.main(args, plugins=[collector])
    tally = ((nodeid.split("[")[0], unit["status"]) for nodeid, unit in collector.units.items())
    summary = suite_runner.summarise(target, tally,
                                     dict(reasons=EXCLUDED, tests=collector.excluded), start)
    return dict(summary=summary, units=collector.units)


def main(argv=None) -> None:
    suite_runner.main(argv, description=__doc__.splitlines()[0], run=run,
                      tests_help="torchsde's tests/ folder (repository, tag v0.2.6)",
                      only_help="pytest -k expressions, or-ed",
                      verbose_help="print each result",
                      n_excluded=lambda excluded: len(excluded["tests"]))


if __name__ == "__main__":
    main()
