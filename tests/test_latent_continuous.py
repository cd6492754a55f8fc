"""Spirals observed at their own times (`make_spirals(times="continuous")`, `odegrad train latent
--times continuous`): the data, and a padded and a per-sample latent ODE training step on it."""

import pytest
import torch

from odegrad.cli import main
from odegrad.data.series import make_spirals
from odegrad.models.latent import LatentODE

SMALL = dict(n_train=12, n_test=4, length=20, keep=0.5)


def test_continuous_times_are_seeded_sorted_and_keep_the_horizon_grid():
    split = make_spirals(times="continuous", seed=3, **SMALL)
    grid = make_spirals(seed=3, **SMALL)
    train, k = split.train, split.train.n_observed
    assert train.times.shape == train.mask.shape == (12, 20)
    assert (train.times.diff(dim=1) > 0).all()  # strictly increasing rows
    assert (train.times[:, 0] == train.t[0]).all()
    assert (train.times[:, 1:k] <= train.t[k - 1]).all()
    assert torch.equal(train.times[:, k:], train.t[k:].expand(12, -1))  # the horizon: the grid
    assert not torch.equal(train.times[0, :k], train.times[1, :k])  # each series its own times
    assert grid.train.times is None and torch.equal(grid.train.mask, train.mask)
    assert torch.equal(grid.train.values[:, k:], train.values[:, k:])  # same draws, horizon
    again = make_spirals(times="continuous", seed=3, **SMALL)
    assert torch.equal(again.train.times, train.times)
    assert torch.equal(again.test.values, split.test.values)
    assert not torch.equal(make_spirals(times="continuous", seed=4, **SMALL).train.times,
                           train.times)
    # the values lie on each series' spiral at its own times (noise 0: |r| = r_0 + 0.3 t)
    clean = make_spirals(times="continuous", seed=3, noise=0.0, **SMALL).train
    radius = clean.values.norm(dim=-1) - 0.3 * clean.times
    assert torch.allclose(radius, radius[:, :1].expand_as(radius), atol=1e-5)
    with pytest.raises(ValueError, match="times must be one of"):
        make_spirals(times="uniform")


@pytest.mark.parametrize("per_sample", [False, True])
def test_padded_and_per_sample_steps_run_on_continuous_times(per_sample):
    train = make_spirals(times="continuous", seed=0, **SMALL).train
    torch.manual_seed(0)
    model = LatentODE(2, 3, 8, 8, 0.1, method="dopri5", rtol=1e-2, atol=1e-3)
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(train.times[:6], train.values[:6], train.mask[:6], train.encoder_mask()[:6],
                 per_sample=per_sample)
    loss.backward()
    optimiser.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with torch.no_grad():
        predicted = model.predict(train.times[:6], train.values[:6], train.encoder_mask()[:6])
    assert predicted.shape == (6, 20, 2)


def test_union_decoder_reads_each_series_at_its_own_times():
    """decode_union at each row's own times = a lone solve of that series at those times."""
    train = make_spirals(times="continuous", seed=1, **SMALL).train
    torch.manual_seed(0)
    model = LatentODE(2, 3, 8, 8, 0.1, method="rk4", step_size=0.05)
    z0 = torch.randn(3, 3)
    with torch.no_grad():
        union = model.decode_union(z0, train.times[:3])
        alone = model.decode(z0[1:2], train.times[1])
    assert torch.allclose(union[1], alone[0], atol=1e-5)


def test_continuous_times_refuse_a_real_series(tmp_path, capsys):
    code = main(["train", "latent", "--times", "continuous", "--dataset", "sunspots",
                 "--no-progress", "--out", str(tmp_path / "run")])
    assert code != 0
    assert "--times continuous needs --dataset spirals" in capsys.readouterr().err
