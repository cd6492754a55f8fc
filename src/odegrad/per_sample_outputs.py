"""The per-sample loop's outputs: every output time a masked step passed, read at once from the
step's dense output, and the reads put in place by one gather when the solve ends.

In the step from t_n to t_{n+1} = t_n + h_n, sample b reads the output times of its row that
lie in (t_n, t_{n+1}]: its next P_b = `counts[b]` columns from `next_output[b]` (the times are
strictly monotonic, so they are consecutive). With P = max_b P_b, one read covers the batch's
(batch, P) slots:

    y(t*) = y_n + Σ_i h_n b_i(θ) K_i,   θ = (t* − t_n)/h_n,   b_i(θ) = Σ_k D_ik θ^k

(the dense output of the tableau, ALGORITHMS.md §1): the weights h_n b_i(θ) per slot, then one
batched matrix product over the stages; y(t*) = y_{n+1} itself at the last time of a landing
step (as the lone solve anchors it). Each step's reads are kept as one (batch, P, ...) block;
`assemble` concatenates the blocks and gathers each output from its block (one op, whose
backward is one scatter-add) instead of rewriting an (n_times, batch, ...) tensor per output.

The slots and, unless the times are differentiated, the weights are computed on the host in
float64 NumPy, where the loop keeps each sample's t_n and h_n (per_sample_loop.py).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class OutputReads:
    """Collects the dense-output reads of a per-sample solve; `assemble` returns the outputs."""

    def __init__(self, y0: Tensor, n_times: int):
        batch = y0.shape[0]
        self.blocks = [y0.unsqueeze(1)]  # block 0: column 0 of every row is y0
        self.width = 1  # columns in the blocks so far
        # source[b, i]: the block column holding output i of sample b; column n_times is a
        # sink for the slots of a read that emit nothing
        self.source = np.zeros((batch, n_times + 1), dtype=np.int64)
        self.rows = np.arange(batch)[:, None]
        self.n_times = n_times

    def slots(self, next_output: np.ndarray, counts: np.ndarray,
              width: int) -> tuple[np.ndarray, np.ndarray]:
        """(index, emit), both (batch, width): slot p of sample b is output next_output[b] + p
        (clipped into the row), emitted when p < counts[b]."""
        offsets = np.arange(width)
        index = np.minimum(next_output[:, None] + offsets, self.n_times - 1)
        return index, offsets < counts[:, None]

    def add(self, values: Tensor, index: np.ndarray, emit: np.ndarray) -> None:
        """Keep one step's reads, values (batch, width, ...), and note where each emitted one
        goes."""
        width = values.shape[1]
        target = np.where(emit, index, self.n_times)
        self.source[self.rows, target] = self.width + np.arange(width)
        self.blocks.append(values)
        self.width += width

    def assemble(self) -> Tensor:
        """The outputs, (n_times, batch, ...): output i of sample b from its block column."""
        reads = torch.cat(self.blocks, dim=1) if len(self.blocks) > 1 else self.blocks[0]
        source = torch.from_numpy(self.source[:, :self.n_times]).to(reads.device)
        rows = torch.arange(reads.shape[0], device=reads.device)[:, None]
        return reads[rows, source].movedim(1, 0)


def host_weights(tab, index: np.ndarray, emit: np.ndarray, times: np.ndarray, t_n: np.ndarray,
                 h: np.ndarray) -> np.ndarray:
    """h_n b_i(θ) per slot and dense stage, float64 (batch, width, stages): θ from the float64
    times (as the lone solve's Python floats; rounded to y's dtype by the caller)."""
    emit_h = np.where(emit, h[:, None], 1.0)
    rows = np.arange(len(index))[:, None]
    theta = np.where(emit, (times[rows, index] - t_n[:, None]) / emit_h, 0.0)
    powers = theta[..., None] ** tab.exponents_np  # (batch, width, degree)
    return h[:, None, None] * (powers @ tab.dense_np)


def differentiable_weights(tab, index: Tensor, emit: Tensor, times: Tensor, t_step: Tensor,
                           h_step: Tensor) -> Tensor:
    """h_n b_i(θ) in y's dtype with θ = (t* − t_n)/h_n from the differentiable times, t_n and
    h_n (when times require grad): (batch, width, stages)."""
    dense = tab.dense[:, tab.dense_stages]
    theta = (times.gather(1, index) - t_step[:, None]) / torch.where(emit, h_step[:, None], 1.0)
    theta = torch.where(emit, theta, 0.0)
    powers = theta.unsqueeze(-1) ** tab.exponents.to(theta.dtype)
    return h_step[:, None, None] * (powers @ dense)


def dense_reads(tab, weights: Tensor, y: Tensor, ks: list[Tensor]) -> Tensor:
    """y_n + Σ_i w_i K_i for every slot: weights (batch, width, stages) -> (batch, width, ...)."""
    batch, width = weights.shape[:2]
    stages = torch.stack([ks[j].reshape(batch, -1) for j in tab.dense_stages], dim=1)
    start = y.reshape(batch, 1, -1).expand(batch, width, -1)
    values = torch.baddbmm(start, weights, stages)  # (batch, width, state)
    return values.reshape(batch, width, *y.shape[1:])
