"""Shared by the block-level caches (FORA, TaylorSeer, ToCa, first-block cache): a block's
effect is its residual (output - input) for the image and the text stream; a cached
block adds a stored or predicted residual instead of running."""

from __future__ import annotations

from specdiff.engine.policy import BlockCall, BlockResult, Policy


class BlockLevelPolicy(Policy):
    """Every token runs (token plan is dense); run_block decides per block."""

    block_level = True


def full_step(step: int, warmup_steps: int, interval: int) -> bool:
    """The first `warmup_steps` steps, then every `interval`-th one, run in full."""
    return step < warmup_steps or (step - warmup_steps) % interval == 0


Residual = tuple  # (image delta (B, N, D), text delta or None)


def run_and_measure(call: BlockCall) -> tuple[BlockResult, Residual]:
    """Run the block; return its result and its residual (output - input, per stream)."""
    new_text, new_tokens = call.run(call.tokens, call.text)
    text_delta = None if new_text is None or call.text is None else new_text - call.text
    return BlockResult(new_text, new_tokens, 1.0), (new_tokens - call.tokens, text_delta)


def add_residual(call: BlockCall, residual: Residual) -> BlockResult:
    """The block skipped: its input plus a stored or predicted residual."""
    image_delta, text_delta = residual
    new_text = None if text_delta is None else call.text + text_delta
    return BlockResult(new_text, call.tokens + image_delta, 0.0)
