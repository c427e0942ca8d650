"""Shared by the block-level caches (FORA, TaylorSeer, ToCa, first-block cache): a block's
effect is its residual (output - input) for the image and the text stream; a cached
block adds a stored or predicted residual instead of running."""

from __future__ import annotations

import torch

from specdiff.engine.policy import DENSE, Policy, StepPlan, StepSignals


class BlockLevelPolicy(Policy):
    """Every token runs (token plan is dense); run_block decides per block."""

    block_level = True

    def plan(self, signals: StepSignals) -> StepPlan:
        return DENSE


def full_step(step: int, warmup_steps: int, interval: int) -> bool:
    """The first `warmup_steps` steps, then every `interval`-th one, run in full."""
    return step < warmup_steps or (step - warmup_steps) % interval == 0


def run_and_measure(block, tokens: torch.Tensor, text: torch.Tensor | None):
    """Run the block; return (text, tokens, residual) with residual = (image delta, text delta or None)."""
    new_text, new_tokens = block(tokens, text)
    text_delta = None if new_text is None or text is None else new_text - text
    return new_text, new_tokens, (new_tokens - tokens, text_delta)


def add_residual(tokens: torch.Tensor, text: torch.Tensor | None, residual):
    image_delta, text_delta = residual
    new_text = None if text_delta is None else text + text_delta
    return new_text, tokens + image_delta


def count_block(state: dict, computed: float, index: int, num_blocks: int) -> None:
    """Tally the share of block work done this step (1 = the whole block ran; shown by specdiff.summary)."""
    state["_ran"] = state.get("_ran", 0) + float(computed) if index else float(computed)
    if index == num_blocks - 1:
        state["blocks_computed"] = state.pop("_ran") / num_blocks
