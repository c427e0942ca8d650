"""What every token-caching attention processor shares, whatever the model.

An adapter's processor computes q/k/v for the image tokens that run this
step (the "active" ones) and for all text tokens. Here those active image
keys/values are written into a per-layer cache that holds every image token,
so active queries attend to all tokens, and cheap attention taps measure how
much attention each image token receives.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time

import torch


@dataclasses.dataclass
class AttentionContext(threading.local):
    """The state a step shares with the processors of one transformer.

    `active` is None on a dense step (every image token runs), else (B, n)
    indices of the image tokens that run. `kv` maps a layer name to the
    cached (keys, values) of all image tokens, shape (B, H, N, D).
    Thread-local: a call of the same transformer from another thread (e.g. a
    plain pipeline sharing it) sees its own, disabled context.
    """

    enabled: bool = False
    active: torch.Tensor | None = None
    kv: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    tap_queries: int = 0  # 0 = no taps this step
    tap_include_text: bool = False
    tap_sum: torch.Tensor | None = None  # (B, N) attention received, summed over layers
    tap_seconds: float = 0.0  # host time spent in taps this step (counted as scoring)
    timestep: float = 0.0  # of the transformer call in progress
    text_length: int = 0  # text tokens of the call in progress
    memo: tuple | None = None  # (key, value): a family's per-step derived tensor (e.g. FLUX's RoPE rows)


def merge_image_kv(
    ctx: AttentionContext, layer: str, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return keys/values of all image tokens, (B, H, N, D), refreshed where active.

    key/value: (B, H, n, D) of the active image tokens (n = N on dense steps).
    """
    if ctx.kv is None:
        return key, value
    if ctx.active is None:
        ctx.kv[layer] = (key, value)
        return key, value
    if layer not in ctx.kv:
        raise RuntimeError(f"sparse step before any dense step filled the key/value cache of {layer}")
    full_k, full_v = ctx.kv[layer]
    if full_k.shape[0] != key.shape[0]:
        raise RuntimeError("batch size changed inside one generation")
    index = ctx.active[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[-1])
    # in place: the cache is this layer's own (nothing else reads the tensors stored at the dense step),
    # so a sparse step writes its active rows without copying all N rows of keys and values
    full_k.scatter_(2, index, key)
    full_v.scatter_(2, index, value)
    return full_k, full_v


def tap_attention(
    ctx: AttentionContext,
    layer_index: int,
    image_queries: torch.Tensor,
    text_queries: torch.Tensor | None,
    keys: torch.Tensor,
    image_key_slice: slice,
    scale: float | None = None,
) -> None:
    """Add the attention each image token receives from a few sampled queries to ctx.tap_sum.

    Queries are spread evenly over the active image tokens, with an offset
    that changes per layer, so the sample is deterministic and covers the grid.
    keys: (B, H, S, D) over the full joint sequence; image_key_slice picks
    the image tokens out of S.
    """
    if ctx.tap_queries <= 0:
        return
    tic = time.perf_counter()
    n = image_queries.shape[2]
    m = min(ctx.tap_queries, n)
    if m == n:
        queries = image_queries  # every query (e.g. a sparse step's few active tokens): no copy
    else:
        offset = (layer_index * 7919) % max(n // m, 1)
        picks = (torch.arange(m, device=image_queries.device) * (n // m) + offset) % n
        queries = image_queries[:, :, picks]
    if ctx.tap_include_text and text_queries is not None:
        queries = torch.cat([queries, text_queries], dim=2)
    scale = scale if scale is not None else 1.0 / math.sqrt(queries.shape[-1])
    # logits in the model's dtype with the scale folded into the few queries (no fp32 copy of all keys);
    # the softmax and the sums in fp32
    weights = torch.softmax(((queries * scale) @ keys.transpose(-1, -2)).float(), dim=-1)
    heads = weights.shape[1]
    received = weights.sum(dim=(1, 2))[:, image_key_slice] / heads  # heads averaged, queries summed
    if ctx.tap_sum is None:
        ctx.tap_sum = received
    else:
        ctx.tap_sum = ctx.tap_sum + received
    ctx.tap_seconds += time.perf_counter() - tic
