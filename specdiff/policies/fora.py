"""FORA (Selvaraju et al., 2024, "Fast-Forward Caching in Diffusion Transformer Acceleration").

Every `interval` steps all blocks run and each block's effect is cached; in
between every block reuses its cached effect unchanged. FORA caches the
attention and MLP outputs of each block; here a block's whole residual
(output - input, both streams) is cached, which is the same reuse up to the
block's timestep-dependent gates. Default interval 3 (FORA's N=3 setting).
"""

from __future__ import annotations

import dataclasses

from specdiff.engine.policy import BlockCall, BlockResult, PolicyConfig, check_int
from specdiff.policies.block_cache import BlockLevelPolicy, add_residual, run_and_measure


@dataclasses.dataclass(frozen=True)
class FORAConfig(PolicyConfig):
    """FORA: run every block every `interval` steps; in between reuse each block's cached residual.

    Args:
        interval (int, default 3): steps between full steps (1 = full compute).
    """

    method = "fora"

    interval: int = 3

    def validate(self) -> None:
        check_int(self, "interval", 1, 100)


class FORAPolicy(BlockLevelPolicy):
    config: FORAConfig

    def new_block_state(self) -> dict:
        return {}  # block index -> its last residual

    def run_block(self, residuals: dict, call: BlockCall) -> BlockResult:
        if call.step % self.config.interval == 0 or call.index not in residuals:
            result, residuals[call.index] = run_and_measure(call)
            return result
        return add_residual(call, residuals[call.index])
