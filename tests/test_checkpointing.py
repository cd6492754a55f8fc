"""Checkpoint schedules: validity, slot bounds and the binomial optimum (against a brute DP)."""

from functools import lru_cache

import pytest

from odegrad.checkpointing import (
    Delete,
    Forward,
    Load,
    OnlineCheckpoints,
    Reverse,
    Save,
    offline_positions,
    optimal_recomputations,
    reverse_segments,
    revolve_advances,
)


def simulate(schedule, kept, n_steps, slots):
    """Execute a schedule on symbolic states; return (step evaluations, most states kept)."""
    kept = set(kept)
    assert 0 in kept and len(kept) <= slots
    current, expected, cost, most = None, n_steps - 1, 0, len(kept)
    for action in schedule.actions:
        if isinstance(action, Load):
            assert action.n in kept, f"load of a state not kept: {action}"
            current = action.n
        elif isinstance(action, Forward):
            assert current == action.n0 and action.n1 > action.n0, action
            cost += action.n1 - action.n0
            current = action.n1
        elif isinstance(action, Save):
            assert current == action.n and action.n not in kept, action
            kept.add(action.n)
            most = max(most, len(kept))
        elif isinstance(action, Delete):
            kept.remove(action.n)
        elif isinstance(action, Reverse):
            assert current == action.n == expected, (action, current, expected)
            cost += 1
            expected -= 1
            current = None
    assert expected == -1, "not every step was reversed"
    assert most <= slots
    assert cost == schedule.recomputed_steps
    return cost, most


@lru_cache(None)
def revolve_dp(l, c):
    """Least evaluations (advances + one per reversed step) to reverse l steps from a kept
    state with c slots: the revolve recursion written out, minimised over every split."""
    if l == 1:
        return 1
    if c == 1:
        return l * (l + 1) // 2
    return min(m + revolve_dp(l - m, c - 1) + revolve_dp(m, c) for m in range(1, l))


@lru_cache(None)
def after_sweep_dp(l, c):
    """The same when the forward sweep already passed: states it kept cost nothing to reach."""
    if l == 1:
        return 1
    if c == 1:
        return revolve_dp(l, 1)
    return min(
        [revolve_dp(l, c)] + [after_sweep_dp(l - m, c - 1) + revolve_dp(m, c) for m in range(1, l)]
    )


def test_griewank_closed_form_matches_the_recursion():
    for c in range(1, 6):
        for l in range(1, 40):
            assert revolve_advances(l, c) + l == revolve_dp(l, c), (l, c)


@pytest.mark.parametrize("slots", [1, 2, 3, 4, 5, 8])
def test_offline_schedule_meets_the_binomial_optimum(slots):
    for n_steps in list(range(1, 41)):
        positions = offline_positions(n_steps, slots)
        cost, _ = simulate(reverse_segments(positions, n_steps, slots), positions, n_steps, slots)
        assert cost == optimal_recomputations(n_steps, slots) == after_sweep_dp(n_steps, slots)


@pytest.mark.parametrize("n_steps", [100, 1000])
@pytest.mark.parametrize("slots", [2, 3, 8, 20])
def test_offline_schedule_large(n_steps, slots):
    positions = offline_positions(n_steps, slots)
    cost, most = simulate(reverse_segments(positions, n_steps, slots), positions, n_steps, slots)
    assert cost == optimal_recomputations(n_steps, slots)
    assert most <= slots


def test_enough_slots_recompute_each_step_once():
    for n_steps in (1, 5, 17):
        positions = offline_positions(n_steps, n_steps + 3)
        assert positions == list(range(n_steps))
        cost, _ = simulate(reverse_segments(positions, n_steps, n_steps), positions, n_steps,
                           n_steps)
        assert cost == n_steps == optimal_recomputations(n_steps, n_steps)


@pytest.mark.parametrize("slots", [1, 2, 3, 4, 8])
def test_online_schedule_stays_within_slots_and_near_the_optimum(slots):
    for n_steps in (1, 2, 7, 30, 100, 300):
        online = OnlineCheckpoints(slots)
        kept = {0}
        for n in range(1, n_steps):
            keep, dropped = online.add(n)
            if dropped is not None:
                kept.remove(dropped)
            if keep:
                kept.add(n)
            assert len(kept) <= slots and 0 in kept
        assert sorted(kept) == online.positions
        schedule = reverse_segments(online.positions, n_steps, slots)
        cost, _ = simulate(schedule, online.positions, n_steps, slots)
        optimum = optimal_recomputations(n_steps, slots)
        assert optimum <= cost <= 1.25 * optimum, (n_steps, cost, optimum)


def test_online_schedule_keeps_everything_when_it_fits():
    online = OnlineCheckpoints(10)
    for n in range(1, 10):
        assert online.add(n) == (True, None)
    assert online.positions == list(range(10))


def test_bad_slots():
    with pytest.raises(ValueError):
        offline_positions(10, 0)
    with pytest.raises(ValueError):
        OnlineCheckpoints(0)
    with pytest.raises(ValueError):
        reverse_segments([0, 3, 5], 10, 2)
