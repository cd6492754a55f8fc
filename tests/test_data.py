"""The offline datasets: digits, MNIST IDX files, 2-D toy densities, spirals, statsmodels."""

import gzip
import math

import numpy as np
import pytest
import torch

from odegrad.data import (
    TOY_DENSITIES,
    load_digits,
    load_mnist,
    load_statsmodels_series,
    make_spirals,
    read_idx,
    sample_toy,
)
from odegrad.data.images import MNIST_FILES


def test_digits_split_is_stratified_standardised_and_seed_independent():
    data = load_digits()
    assert data.x_train.shape == (1437, 1, 8, 8) and data.x_test.shape == (360, 1, 8, 8)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert abs(float(data.x_train.mean())) < 1e-5 and abs(float(data.x_train.std()) - 1) < 1e-4
    counts = torch.bincount(data.y_test, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37
    # the split depends on split_seed only, and no test image is also a training image
    again = load_digits()
    assert torch.equal(again.y_test, data.y_test)
    train_rows = {tuple(r.tolist()) for r in data.x_train.flatten(1)}
    duplicates = sum(tuple(r.tolist()) in train_rows for r in data.x_test.flatten(1))
    assert duplicates <= 2  # digits holds a couple of identical images


def _write_idx(path, array: np.ndarray, compress: bool = False):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def test_read_idx_round_trip_and_corruption(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a", array)
    _write_idx(tmp_path / "a.gz", array, compress=True)
    assert np.array_equal(read_idx(tmp_path / "a"), array)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    (tmp_path / "bad").write_bytes((tmp_path / "a").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "bad")
    (tmp_path / "magic").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "magic")


def test_mnist_from_local_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    images = {"x_train": rng.integers(0, 256, (6, 28, 28)),
              "x_test": rng.integers(0, 256, (4, 28, 28))}
    labels = {"y_train": np.arange(6) % 10, "y_test": np.arange(4)}
    for key, stem in MNIST_FILES.items():
        compress = key == "x_train"  # plain and gzipped files both work
        name = stem + ".gz" if compress else stem
        _write_idx(tmp_path / name, {**images, **labels}[key], compress=compress)
    data = load_mnist(tmp_path)
    assert data.x_train.shape == (6, 1, 28, 28) and data.x_test.shape == (4, 1, 28, 28)
    assert data.y_test.tolist() == [0, 1, 2, 3]
    # standardised with the training pixels' statistics (scaled to [0, 1] first)
    raw = torch.as_tensor(images["x_train"], dtype=torch.float32) / 255
    expected = (raw - raw.mean()) / raw.std()
    assert torch.allclose(data.x_train[:, 0], expected, atol=1e-5)


def test_mnist_missing_files_say_where_to_put_them(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_mnist(tmp_path / "nowhere")
    message = str(error.value)
    assert str(tmp_path / "nowhere") in message and "--data-dir" in message
    for stem in MNIST_FILES.values():
        assert stem in message


@pytest.mark.parametrize("name", TOY_DENSITIES)
def test_toy_densities_are_reproducible_and_finite(name):
    a = sample_toy(name, 500, torch.Generator().manual_seed(1))
    b = sample_toy(name, 500, torch.Generator().manual_seed(1))
    c = sample_toy(name, 500, torch.Generator().manual_seed(2))
    assert a.shape == (500, 2) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.abs().max()) < 6.0


def test_toy_density_shapes():
    g = torch.Generator().manual_seed(0)
    # moons: each point lies near one of the two (scaled) half circles
    x = (sample_toy("moons", 2000, g) - torch.tensor([-1.0, -0.2])) / 2
    upper = (x.norm(dim=-1) - 1).abs()
    lower = ((x - torch.tensor([1.0, 0.5])).norm(dim=-1) - 1).abs()
    assert float(torch.minimum(upper, lower).mean()) < 0.12
    # checkerboard: every point on a square whose indices have an even sum
    x = sample_toy("checkerboard", 2000, g) / 2
    assert bool(((torch.floor(x[:, 0]) - torch.floor(x[:, 1])).remainder(2) == 0).all())
    # 8 gaussians: eight clusters around radius 4/√2
    x = sample_toy("8gaussians", 2000, g)
    assert abs(float(x.norm(dim=-1).median()) - 4 / math.sqrt(2)) < 0.2
    # circles: radii 3 and 1.5
    radius = sample_toy("circles", 2000, g).norm(dim=-1)
    assert abs(float(radius[:1000].mean()) - 3.0) < 0.1
    assert abs(float(radius[1000:].mean()) - 1.5) < 0.1
    with pytest.raises(ValueError, match="valid: moons"):
        sample_toy("swissroll", 10)


def test_spirals_are_archimedean_and_irregular():
    split = make_spirals(n_train=30, n_test=10, length=50, noise=0.0, keep=0.4, seed=3)
    train = split.train
    assert train.values.shape == (30, 50, 2) and len(split.test) == 10
    radius = train.values.norm(dim=-1)
    # r(t) = r0 + 0.3 t exactly without noise
    assert torch.allclose(radius - 0.3 * train.t, radius[:, :1].expand(-1, 50), atol=1e-5)
    assert bool((train.mask[:, 0] == 1).all())
    assert abs(float(train.mask.mean()) - 0.4) < 0.06
    # series differ in which points they keep
    assert not torch.equal(train.mask[0], train.mask[1])
    encoder = train.encoder_mask()
    assert float(encoder[:, train.n_observed:].abs().sum()) == 0.0
    assert torch.equal(encoder[:, :train.n_observed], train.mask[:, :train.n_observed])


@pytest.mark.parametrize("normalise", ["window", "global"])
def test_statsmodels_sunspots_windows_come_from_the_record(normalise):
    import statsmodels.datasets as datasets

    raw = datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy()
    split = load_statsmodels_series("sunspots", window=40, stride=5, train_fraction=0.7,
                                    normalise=normalise)
    boundary = int(0.7 * len(raw))
    assert split.time_unit == "year" and split.train.n_observed == 30
    restored = split.train.original(split.train.values)[..., 0]
    for k in range(len(split.train)):
        assert np.allclose(restored[k].numpy(), raw[5 * k:5 * k + 40], rtol=1e-5, atol=1e-3)
    first_test = split.test.original(split.test.values)[0, :, 0]
    assert np.allclose(first_test.numpy(), raw[boundary:boundary + 40], rtol=1e-5, atol=1e-3)
    values = split.train.values[..., 0]
    if normalise == "global":
        assert math.isclose(float(split.train.offset[0]), raw[:boundary].mean(), rel_tol=1e-6)
        assert torch.allclose(split.train.scale, split.train.scale[0])
    else:
        # standardised by the observed points of the observation window only
        seen = split.train.encoder_mask()
        mean = (values * seen).sum(1) / seen.sum(1)
        var = ((values - mean[:, None]) ** 2 * seen).sum(1) / seen.sum(1)
        assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-5)
        assert torch.allclose(var, torch.ones_like(var), atol=1e-4)


def test_statsmodels_co2_is_monthly_and_gap_free():
    split = load_statsmodels_series("co2", window=48)
    assert split.time_unit == "month"
    assert torch.isfinite(split.train.values).all() and torch.isfinite(split.test.values).all()
    with pytest.raises(ValueError, match="does not fit"):
        load_statsmodels_series("sunspots", window=400)
