"""The engine's small pieces on hand-made numbers: the multi-level fill (C1 / C2 / C3), SpecDiff's
approximation weights, the lowest-mass selection, the step-to-step history, and TaylorSeer's order-1
prediction. Each expected value is worked out here, so a change in the rule fails."""

from __future__ import annotations

import math

import torch

from specdiff.engine.history import TokenHistory, approximation_weights, inverse_gap
from specdiff.engine.policy import BlockCall, top_tokens
from specdiff.policies.specdiff import lowest_mass
from specdiff.policies.taylorseer import TaylorSeerConfig, TaylorSeerPolicy


def test_approximation_weights_follow_the_formula():
    weights = approximation_weights([900.0, 950.0, 1000.0], 850.0)  # most recent first
    raw = [math.exp(-1) * 50, math.exp(-2) * 100, math.exp(-3) * 150]
    assert weights == [r / sum(raw) for r in raw]
    assert abs(sum(weights) - 1) < 1e-12 and all(w > 0 for w in weights)
    assert approximation_weights([500.0, 500.0, 500.0], 500.0) == [1.0, 0.0, 0.0]  # no distance: the last output


def _history(outputs, timesteps):
    history = TokenHistory()
    for output, t in zip(outputs, timesteps):
        history.record(output, None, t)
    return history


def test_the_fill_computes_reuses_and_approximates_the_right_tokens():
    """One row, five tokens of one channel: token 0 computed (C1), tokens 1-2 copy their last output (C2),
    tokens 3-4 take the weighted average of their last three outputs (C3)."""
    oldest, middle, last = (torch.full((1, 5, 1), v) for v in (1.0, 2.0, 4.0))
    history = _history([oldest, middle, last], [1000.0, 950.0, 900.0])
    assert [float(o[0, 0, 0]) for o in history.outputs] == [4.0, 2.0, 1.0]  # most recent first
    weights = approximation_weights(history.timesteps, 850.0)
    computed = torch.tensor([[[9.0]]])
    reuse = torch.tensor([[False, True, True, False, False]])
    output = history.assemble(computed, torch.tensor([[0]]), reuse, torch.tensor(weights))
    approximated = weights[0] * 4.0 + weights[1] * 2.0 + weights[2] * 1.0
    expected = torch.tensor([9.0, 4.0, 4.0, approximated, approximated]).view(1, 5, 1)
    torch.testing.assert_close(output, expected)
    # with fewer than three outputs every non-computed token copies its last output
    short = _history([oldest, middle], [1000.0, 950.0])
    output = short.assemble(computed, torch.tensor([[0]]), reuse, None)
    torch.testing.assert_close(output, torch.tensor([9.0, 2.0, 2.0, 2.0, 2.0]).view(1, 5, 1))


def test_history_counts_cached_steps_and_keeps_three_outputs_in_place():
    history = TokenHistory()
    history.record(torch.zeros(1, 4, 2), None, 1000.0)
    ring = history.outputs[0].data_ptr()
    for step, active in enumerate(([[0, 1]], [[1, 2]], [[1, 3]]), start=1):
        history.record(torch.full((1, 4, 2), float(step)), torch.tensor(active), 1000.0 - 100 * step)
    assert history.cached_count.tolist() == [[2, 0, 1, 0]]  # steps since each token last ran
    assert [float(o[0, 0, 0]) for o in history.outputs] == [3.0, 2.0, 1.0] and len(history) == 3
    assert history.timesteps == [700.0, 800.0, 900.0]
    assert history.outputs[0].data_ptr() == ring  # the same storage: written in place
    assert inverse_gap(800.0, 700.0) == 0.01 and inverse_gap(5.0, 5.0) == 1e6


def test_lowest_mass_picks_the_lowest_tokens_within_the_mass():
    score = torch.tensor([[5.0, 1.0, 0.5, 3.0, 0.5]])  # total 10: 10 % is 1.0
    assert lowest_mass(score, 0.1).tolist() == [[False, False, True, False, True]]  # 0.5 + 0.5 <= 1.0
    assert lowest_mass(score, 0.2).tolist() == [[False, True, True, False, True]]  # + 1.0 = 2.0 <= 2.0
    assert not lowest_mass(score, 0.0).any() and lowest_mass(score, 1.0).all()


def test_top_tokens_keeps_the_highest_scores():
    score = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2]])
    assert sorted(top_tokens(score, 0.6)[0].tolist()) == [1, 3]  # (1 - 0.6) * 5 = 2 tokens
    assert top_tokens(score, 0.99).shape == (1, 1)  # at least one token


def test_taylorseer_order_one_extrapolates_the_residual_linearly():
    """Full steps 1 and 4 (warm-up 1, interval 3) with residuals 1 and 4 per element: the first difference
    is (4 - 1) / 3 = 1 per step, so steps 5 and 6 predict 5 and 6; order 0 reuses 4."""
    tokens = torch.zeros(1, 2, 1)

    def call(step, residual):
        def run(x, c, active=None):
            return None, x + residual
        return BlockCall(0, 1, step, 10, tokens, None, run)

    for order, expected in ((1, (5.0, 6.0)), (0, (4.0, 4.0))):
        policy = TaylorSeerPolicy(TaylorSeerConfig(interval=3, order=order, warmup_steps=1))
        state = policy.new_block_state()
        for step, residual in ((1, 1.0), (4, 4.0)):  # full steps: the block runs
            assert policy.run_block(state, call(step, residual)).work == 1.0
        for step, value in zip((5, 6), expected):  # skipped steps: the block must not run
            predicted = policy.run_block(state, call(step, float("nan")))
            assert predicted.work == 0.0
            torch.testing.assert_close(predicted.tokens, torch.full((1, 2, 1), value))
