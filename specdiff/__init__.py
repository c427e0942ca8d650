"""specdiff: training-free acceleration of diffusion transformers by self-speculative token caching.

Names are imported on first use, so `specdiff --help` and `import specdiff.lab.cli` do not pay for
torch and diffusers until something needs them. Everything here is the library (engine, policies,
adapters, integration, configs), except `tune`, the lab's entry point (it needs the `lab` extra).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_WHERE = {
    "ConfigError": "specdiff.engine.policy",
    "FORAConfig": "specdiff.policies.fora",
    "FirstBlockCacheConfig": "specdiff.policies.first_block",
    "FullComputeConfig": "specdiff.policies.full",
    "GenerationSummary": "specdiff.engine.runtime",
    "POLICIES": "specdiff.policies.registry",
    "RASConfig": "specdiff.policies.ras",
    "RandomTokensConfig": "specdiff.policies.random_tokens",
    "SUPPORTED": "specdiff.integration",
    "SpecDiffConfig": "specdiff.policies.specdiff",
    "StepEvent": "specdiff.engine.runtime",
    "TaylorSeerConfig": "specdiff.policies.taylorseer",
    "ToCaConfig": "specdiff.policies.toca",
    "UnsupportedModelError": "specdiff.integration",
    "accelerated": "specdiff.integration",
    "compile_blocks": "specdiff.integration",
    "config_for": "specdiff.policies.registry",
    "disable": "specdiff.integration",
    "enable": "specdiff.integration",
    "is_enabled": "specdiff.integration",
    "load_config": "specdiff.configs",
    "load_tuned": "specdiff.configs",
    "TunedSetting": "specdiff.configs",
    "save_config": "specdiff.configs",
    "tune": "specdiff.lab.evaluation.tune",
    "observe": "specdiff.integration",
    "register_policy": "specdiff.policies.registry",
    "summary": "specdiff.integration",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'specdiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
