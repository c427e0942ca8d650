"""Other libraries' caches, run on the same pipeline in the same benchmark.

cache-dit (optional, `pip install cache-dit`): DBCache through its one-call
`enable_cache` / `disable_cache`.

diffusers' own hooks (0.42): TaylorSeerCache and FirstBlockCache. On a FLUX
transformer (it has diffusers' CacheMixin) they go through `enable_cache`;
SD3's transformer has no CacheMixin and its pipeline sets no cache context,
so the hook is applied directly and the generation runs inside a "cond"
cache context. Each generation gets fresh hooks (applied, run, removed).
"""

from __future__ import annotations

import contextlib

PEERS = ("diffusers-taylorseer", "diffusers-fbc", "cache-dit-dbcache")


def check_peer(pipe, name: str) -> None:
    """Refuse, before any generation, a peer that cannot run on this pipeline (one line saying why)."""
    if name == "cache-dit-dbcache":
        import os

        os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # read when cache_dit is first imported
        try:
            import cache_dit  # noqa: F401
        except ImportError:
            raise ValueError("cache-dit-dbcache needs the cache-dit package: pip install cache-dit") from None
    if name == "diffusers-fbc":
        from diffusers.models.cache_utils import CacheMixin

        if not isinstance(pipe.transformer, CacheMixin):
            raise ValueError(
                f"diffusers-fbc cannot run on {type(pipe.transformer).__name__}: diffusers' FirstBlockCache needs "
                "a transformer with its CacheMixin (FLUX.1, FLUX.2, Qwen-Image, Wan here); on SD3-family models it "
                "hooks the last block, which returns no text stream"
            )
        if type(pipe.transformer).__name__ == "Flux2Transformer2DModel":
            # measured with diffusers 0.42: its hook subtracts a list from a tensor at the first step
            raise ValueError("diffusers-fbc cannot run on Flux2Transformer2DModel: diffusers' FirstBlockCache fails "
                             "inside its hook on FLUX.2's blocks (TypeError); use diffusers-taylorseer here")


@contextlib.contextmanager
def cache_dit_dbcache(pipe, fields: dict):
    """cache-dit's DBCache (F1B0 unless told otherwise); pipelines it does not know
    (the embedded model's) get a BlockAdapter over the SD3-style block list."""
    import os

    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # read when cache_dit is first imported
    try:
        import cache_dit
    except ImportError:
        raise ValueError("cache-dit-dbcache needs the cache-dit package: pip install cache-dit") from None
    options = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, **fields}
    had_forward = "forward" in vars(pipe.transformer)
    config = cache_dit.DBCacheConfig(**options)
    try:
        cache_dit.enable_cache(pipe, cache_config=config)
    except ValueError:
        from cache_dit import BlockAdapter, ForwardPattern

        adapter = BlockAdapter(pipe=pipe, transformer=pipe.transformer, blocks=pipe.transformer.transformer_blocks,
                               forward_pattern=ForwardPattern.Pattern_1)
        cache_dit.enable_cache(adapter, cache_config=config)
    try:
        yield
    finally:
        cache_dit.disable_cache(pipe)
        if not had_forward:
            # seen with cache-dit 1.5.3 and a BlockAdapter: disable_cache leaves an
            # instance-level forward on the transformer; put the instance back as it was
            vars(pipe.transformer).pop("forward", None)


@contextlib.contextmanager
def diffusers_cache(pipe, name: str, fields: dict):
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, TaylorSeerCacheConfig
    from diffusers.models.cache_utils import CacheMixin

    if name == "cache-dit-dbcache":
        with cache_dit_dbcache(pipe, fields):
            yield
        return

    transformer = pipe.transformer
    has_mixin = isinstance(transformer, CacheMixin)
    if name == "diffusers-taylorseer":
        config = TaylorSeerCacheConfig(**fields)
        hook_name = "taylorseer_cache"
    elif name == "diffusers-fbc":
        if not has_mixin:
            raise ValueError(
                "diffusers-fbc runs only on transformers with diffusers' CacheMixin (FLUX only here of the SD3 / "
                "FLUX pair): on SD3-family transformers diffusers' FirstBlockCache hooks the last block, which "
                "returns no text stream"
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
