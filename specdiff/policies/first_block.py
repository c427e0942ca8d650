"""First-block cache (as in diffusers' FirstBlockCache, TeaCache's idea, cache-dit's DBCache F1B0).

Every step runs the first block. When its residual changed by less than
`threshold` (mean absolute change relative to the previous step's, image
stream) the remaining blocks are skipped and their residuals from the last
step that ran them are added instead. Default threshold 0.05 (diffusers'
default); `warmup_steps` always run in full.
"""

from __future__ import annotations

import dataclasses

import torch

from specdiff.engine.policy import BlockCall, BlockResult, PolicyConfig, check_int, check_range
from specdiff.policies.block_cache import BlockLevelPolicy, add_residual, run_and_measure


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

    def new_block_state(self) -> "FirstBlockState":
        return FirstBlockState()

    def run_block(self, state: "FirstBlockState", call: BlockCall) -> BlockResult:
        if call.index == 0:
            result, residual = run_and_measure(call)
            previous, state.first = state.first, residual[0]
            state.skip = False
            if previous is not None and call.step >= self.config.warmup_steps and len(state.residuals) == call.count - 1:
                change = (residual[0] - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12)
                state.skip = change.item() < self.config.threshold
            return result
        if state.skip:
            return add_residual(call, state.residuals[call.index])
        result, state.residuals[call.index] = run_and_measure(call)
        return result


@dataclasses.dataclass
class FirstBlockState:
    residuals: dict = dataclasses.field(default_factory=dict)  # block index (>= 1) -> its last residual
    first: torch.Tensor | None = None  # the first block's last image residual
    skip: bool = False  # this step reuses blocks 1 .. count - 1
