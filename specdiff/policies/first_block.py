"""First-block cache (as in diffusers' FirstBlockCache, TeaCache's idea, cache-dit's DBCache F1B0).

Every step runs the first block. When its residual changed by less than
`threshold` (mean absolute change relative to the previous step's, image
stream) the remaining blocks are skipped and their residuals from the last
step that ran them are added instead. Default threshold 0.05 (diffusers'
default); `warmup_steps` always run in full.
"""

from __future__ import annotations

import dataclasses

from specdiff.engine.policy import PolicyConfig, check_int, check_range
from specdiff.policies.block_cache import BlockLevelPolicy, add_residual, count_block, run_and_measure


@dataclasses.dataclass(frozen=True)
class FirstBlockCacheConfig(PolicyConfig):
    """First-block cache: skip all blocks after the first while the first block's residual barely changes.

    Args:
        threshold (float, default 0.05): relative change of the first block's residual below which the
            other blocks reuse their cached residual.
        warmup_steps (int, default 1): steps at the start that run in full.
    """

    method = "firstblock"

    threshold: float = 0.05
    warmup_steps: int = 1

    def validate(self) -> None:
        check_range(self, "threshold", 0.0, 10.0)
        check_int(self, "warmup_steps", 1)


class FirstBlockCachePolicy(BlockLevelPolicy):
    config: FirstBlockCacheConfig

    def run_block(self, state, step, num_steps, index, num_blocks, block, tokens, text):
        cache = state.setdefault("residuals", {})
        if index == 0:
            text, tokens, residual = run_and_measure(block, tokens, text)
            previous = state.get("first")
            state["first"] = residual[0]
            skip = False
            if previous is not None and step >= self.config.warmup_steps and len(cache) == num_blocks - 1:
                change = (residual[0] - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12)
                skip = change.item() < self.config.threshold
            state["skip"] = skip
            count_block(state, True, index, num_blocks)
            return text, tokens
        skip = state["skip"]
        count_block(state, not skip, index, num_blocks)
        if skip:
            return add_residual(tokens, text, cache[index])
        text, tokens, cache[index] = run_and_measure(block, tokens, text)
        return text, tokens
