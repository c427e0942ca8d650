"""ToCa (Zou et al., 2025, "Accelerating Diffusion Transformers with Token-wise Feature Caching").

Full steps: the first `warmup_steps`, then every `interval`-th step; they
run every token through every block and cache each block's per-token
residual. In between, each block recomputes only the `recompute_ratio`
highest-scoring image tokens (all text tokens run) and the others take their
cached residual. Recomputed tokens attend to every token through the
engine's key/value cache. Score: the l2 norm of the token's cached residual
in that block times exp(staleness_scale * steps since it was recomputed) —
ToCa's attention-map score needs full attention maps, which this engine
avoids; the norm is its cheap stand-in, the staleness term is ToCa's.
Defaults: interval 4, 10% recomputed, first 3 steps full (its FLUX setting).
"""

from __future__ import annotations

import dataclasses

import torch

from specdiff.engine.policy import BlockCall, BlockResult, PolicyConfig, check_int, check_range, top_tokens
from specdiff.engine.tokens import gather_tokens
from specdiff.policies.block_cache import BlockLevelPolicy, full_step, run_and_measure


@dataclasses.dataclass(frozen=True)
class ToCaConfig(PolicyConfig):
    """ToCa (token-wise caching): full steps every `interval`; in between each block recomputes a few tokens.

    Args:
        interval (int, default 4): steps between full steps (1 = full compute).
        recompute_ratio (float, default 0.1): share of image tokens each block recomputes between full
            steps, in (0, 1].
        warmup_steps (int, default 3): steps at the start that run in full.
        staleness_scale (float, default 0.5): weight of the steps since a token was recomputed in its score.
    """

    method = "toca"

    interval: int = 4
    recompute_ratio: float = 0.1
    warmup_steps: int = 3
    staleness_scale: float = 0.5

    def validate(self) -> None:
        check_int(self, "interval", 1, 100)
        check_range(self, "recompute_ratio", 0.0, 1.0, low_open=True)
        check_int(self, "warmup_steps", 1)
        check_range(self, "staleness_scale", 0.0, 10.0)


class ToCaPolicy(BlockLevelPolicy):
    config: ToCaConfig
    reads_kv_cache = True

    def new_block_state(self) -> "ToCaState":
        return ToCaState()

    def run_block(self, state: "ToCaState", call: BlockCall) -> BlockResult:
        index, tokens, text = call.index, call.tokens, call.text
        if full_step(call.step, self.config.warmup_steps, self.config.interval) or index not in state.residuals:
            result, state.residuals[index] = run_and_measure(call)
            state.stale[index] = torch.zeros(tokens.shape[:2], device=tokens.device)
            return result
        image_residual, _ = state.residuals[index]
        score = image_residual.float().norm(dim=-1) * torch.exp(self.config.staleness_scale * state.stale[index])
        active = top_tokens(score, 1.0 - self.config.recompute_ratio)
        subset = gather_tokens(tokens, active)
        new_text, new_subset = call.run(subset, text, active=active)
        index_rows = active.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        image_residual = image_residual.scatter(1, index_rows, new_subset - subset)
        text_residual = None if new_text is None or text is None else new_text - text
        state.residuals[index] = (image_residual, text_residual)
        state.stale[index] = (state.stale[index] + 1).scatter(1, active, 0.0)
        return BlockResult(new_text, tokens + image_residual, active.shape[1] / tokens.shape[1])


@dataclasses.dataclass
class ToCaState:
    residuals: dict = dataclasses.field(default_factory=dict)  # block index -> (image, text) residual
    stale: dict = dataclasses.field(default_factory=dict)  # block index -> (B, N) steps since each token ran
