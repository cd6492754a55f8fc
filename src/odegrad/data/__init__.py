"""Datasets that work offline: images, 2-D toy densities and irregularly sampled series."""

from .images import Images, default_mnist_dir, load_digits, load_mnist, read_idx
from .series import SERIES, Series, SeriesSplit, load_statsmodels_series, make_spirals
from .toy2d import TOY_DENSITIES, sample_toy

__all__ = [
    "Images",
    "load_digits",
    "load_mnist",
    "default_mnist_dir",
    "read_idx",
    "TOY_DENSITIES",
    "sample_toy",
    "Series",
    "SeriesSplit",
    "SERIES",
    "make_spirals",
    "load_statsmodels_series",
]
