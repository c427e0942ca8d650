"""Other libraries' caches, run on the same pipeline in the same benchmark.

diffusers' own hooks (0.42): TaylorSeerCache and FirstBlockCache. On a FLUX
transformer (it has diffusers' CacheMixin) they go through `enable_cache`;
SD3's transformer has no CacheMixin and its pipeline sets no cache context,
so the hook is applied directly and the generation runs inside a "cond"
cache context. Each generation gets fresh hooks (applied, run, removed).
"""

from __future__ import annotations

import contextlib

PEERS = ("diffusers-taylorseer", "diffusers-fbc")


@contextlib.contextmanager
def diffusers_cache(pipe, name: str, fields: dict):
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, TaylorSeerCacheConfig
    from diffusers.models.cache_utils import CacheMixin

    transformer = pipe.transformer
    has_mixin = isinstance(transformer, CacheMixin)
    if name == "diffusers-taylorseer":
        config = TaylorSeerCacheConfig(**fields)
        hook_name = "taylorseer_cache"
    elif name == "diffusers-fbc":
        if not has_mixin:
            raise ValueError(
                "diffusers-fbc runs on FLUX only here: on SD3-family transformers diffusers' FirstBlockCache "
                "hooks the last block, which returns no text stream"
            )
        config = FirstBlockCacheConfig(**fields)
        hook_name = None
    else:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
    if has_mixin:
        transformer.enable_cache(config)
        try:
            yield
        finally:
            transformer.disable_cache()
        return
    from diffusers.hooks import apply_taylorseer_cache

    apply_taylorseer_cache(transformer, config)
    try:
        with CacheMixin.cache_context(transformer, "cond"):
            yield
    finally:
        HookRegistry.check_if_exists_or_initialize(transformer).remove_hook(hook_name, recurse=True)
