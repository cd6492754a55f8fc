"""DistributedDataParallel on 2 CPU processes (gloo) against one process on the same global batch.

One spawn serves every check: each rank joins through `odegrad.distributed.setup` (env://, as
under torchrun), computes DDP gradients of each model on its half of the global batch for every
available gradient method, and then runs `odegrad train classifier` for two iterations.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from odegrad import distributed
from odegrad.gradients import available_gradients
from odegrad.models import CNF, LatentODE, ODENetClassifier

GRADIENTS = available_gradients()
MODELS = ("classifier", "cnf", "latent")
WORLD = 2
GLOBAL_BATCH = 8
# Fixed steps: the steps (and so the discretisation) do not depend on the batch, which an
# adaptive controller's error norm over the batch would.
SOLVER = dict(method="rk4", step_size=0.25)


class Loss(nn.Module):
    """The model and its loss as one module, so that DDP sees a single forward call."""

    def __init__(self, name: str, gradient: str):
        super().__init__()
        self.name = name
        if name == "classifier":
            self.model = ODENetClassifier(1, 3, channels=4, pool=2, gradient=gradient, **SOLVER)
        elif name == "cnf":
            self.model = CNF(2, hidden=(8, 8), trace="exact", gradient=gradient, **SOLVER)
        else:
            self.model = LatentODE(1, latent_dim=2, hidden=8, encoder_hidden=8,
                                   gradient=gradient, **SOLVER)

    def forward(self, *batch):
        if self.name == "classifier":
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)
        if self.name == "cnf":
            return self.model(batch[0])
        # the latent ODE's deterministic path (posterior mean), decoded at 5 output times
        t, values, mask = batch
        return (self.model.predict(t[0], values, mask) - values).pow(2).mean()


def _global_batch(name: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    if name == "classifier":
        return [torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)]
    if name == "cnf":
        return [torch.randn(GLOBAL_BATCH, 2, generator=g, dtype=torch.float64)]
    t = torch.linspace(0, 1, 5, dtype=torch.float64).expand(GLOBAL_BATCH, 5)
    values = torch.randn(GLOBAL_BATCH, 5, 1, generator=g, dtype=torch.float64)
    mask = (torch.rand(GLOBAL_BATCH, 5, generator=g) < 0.7).double()
    return [t, values, mask]


def _gradients(name: str, gradient: str, context: distributed.Context | None):
    """Parameter gradients: DDP on this rank's half of the batch, or one process on all of it."""
    torch.manual_seed(5)
    module = Loss(name, gradient).double()
    batch = _global_batch(name)
    if context is not None:
        module = distributed.wrap(module, context)
        half = GLOBAL_BATCH // context.world_size
        batch = [b[context.rank * half:(context.rank + 1) * half] for b in batch]
    module(*batch).backward()
    return [p.grad.clone() for p in distributed.unwrap(module).parameters()]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    context = distributed.setup("cpu")
    results: dict = {"rank": context.rank, "world_size": context.world_size}
    for gradient in GRADIENTS:
        for name in MODELS:
            try:
                results[gradient, name] = _gradients(name, gradient, context)
            except Exception as error:  # noqa: BLE001 - reported by the test for this pair
                results[gradient, name] = f"{type(error).__name__}: {error}"
    torch.save(results, Path(out) / f"rank{rank}.pt")

    from odegrad.cli import main

    code = main(["train", "classifier", "--channels", "4", "--epochs", "1", "--max-iters", "2",
                 "--batch-size", "16", "--no-progress", "--out", str(Path(out) / "run")])
    (Path(out) / f"cli{rank}.txt").write_text(str(code))
    distributed.shutdown(context)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    processes = mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 300
    while not processes.join(timeout=5):
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail("the 2-process DDP run did not finish in 300 s")
    return out, [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("gradient", GRADIENTS)
def test_ddp_gradients_equal_single_process(ddp_results, gradient, name):
    _, ranks = ddp_results
    reference = _gradients(name, gradient, None)
    for results in ranks:
        assert results["world_size"] == WORLD
        got = results[gradient, name]
        assert not isinstance(got, str), got
        assert len(got) == len(reference)
        for g, r in zip(got, reference):
            assert torch.allclose(g, r, rtol=1e-10, atol=1e-13)


def test_ddp_train_command_runs_on_two_processes(ddp_results):
    import json

    out, _ = ddp_results
    assert [(out / f"cli{r}.txt").read_text() for r in range(WORLD)] == ["0", "0"]
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["world_size"] == WORLD and summary["iterations"] == 2
    assert (out / "run" / "model.pt").exists()
