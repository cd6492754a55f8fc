import pytest
import torch

from odegrad.loop import integrate


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """The suite's problems are tiny: intra-op threads only add barrier waits, and on a loaded
    2-core machine they spin (BatchNorm in float64 ran ~100x slower with 2 threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class MLPField(torch.nn.Module):
    """A tanh MLP vector field that also depends on t (used across gradient tests)."""

    def __init__(self, dim: int = 3, hidden: int = 8, dtype=torch.float64):
        super().__init__()
        self.l1 = torch.nn.Linear(dim + 1, hidden, dtype=dtype)
        self.l2 = torch.nn.Linear(hidden, dim, dtype=dtype)

    def forward(self, t, y):
        tt = t.expand(*y.shape[:-1], 1)
        return self.l2(torch.tanh(self.l1(torch.cat([y, tt], dim=-1))))


@pytest.fixture
def mlp_field():
    return MLPField()


def integrate_keeping_final_state(f, y0, t, solver, **kwargs):
    """(outputs, trajectory, the last augmented state) of a forward loop run without a graph:
    reversible schemes' states hold more than the outputs show (z beside y, or the velocity)."""
    final = []
    with torch.no_grad():
        outputs, trajectory = integrate(
            f, y0, t, solver, on_step=lambda record, y, step: final.append(step.y), **kwargs
        )
    return outputs, trajectory, final[-1]


@pytest.fixture
def run_keeping_final_state():
    return integrate_keeping_final_state


@pytest.fixture
def counter(monkeypatch):
    """torch.compile's backend swapped for a counting one (the captured graphs run eagerly)."""
    from torch._dynamo.testing import CompileCounter

    from odegrad import compiled

    backend = CompileCounter()
    monkeypatch.setattr(compiled, "BACKEND", backend)
    torch._dynamo.reset()
    return backend


@pytest.fixture
def host_reads(monkeypatch):
    """{"n": the host reads of tensors so far} (item, tolist, bool, float, int, index), counted
    from here to the test's end."""
    calls = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls
