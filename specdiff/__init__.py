"""specdiff: training-free acceleration of diffusion transformers by self-speculative token caching."""

from specdiff.engine.runtime import GenerationSummary
from specdiff.engine.runtime import StepEvent
from specdiff.integration import (
    SUPPORTED, UnsupportedModelError, accelerated, disable, enable, is_enabled, observe, summary,
)
from specdiff.engine.policy import ConfigError
from specdiff.policies.first_block import FirstBlockCacheConfig
from specdiff.policies.fora import FORAConfig
from specdiff.policies.full import FullComputeConfig
from specdiff.policies.random_tokens import RandomTokensConfig
from specdiff.policies.ras import RASConfig
from specdiff.policies.registry import POLICIES, config_for
from specdiff.policies.specdiff import SpecDiffConfig
from specdiff.policies.taylorseer import TaylorSeerConfig
from specdiff.policies.toca import ToCaConfig

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "FORAConfig",
    "FirstBlockCacheConfig",
    "FullComputeConfig",
    "GenerationSummary",
    "POLICIES",
    "RASConfig",
    "RandomTokensConfig",
    "SUPPORTED",
    "SpecDiffConfig",
    "StepEvent",
    "TaylorSeerConfig",
    "ToCaConfig",
    "UnsupportedModelError",
    "accelerated",
    "config_for",
    "disable",
    "enable",
    "is_enabled",
    "observe",
    "summary",
]
