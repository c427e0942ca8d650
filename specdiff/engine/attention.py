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


TAP_CHUNK_ELEMENTS = 2**25  # fp32 attention weights per tap chunk: 128 MiB
# On a CPU smaller chunks: at SD3-medium's shapes the taps went from 5-6 % to 2.6 % of a sparse call
# (BENCHMARKS.md section 10); on a GPU fewer, larger chunks (each chunk is several kernel launches)
TAP_CHUNK_ELEMENTS_CPU = 2**20

class AttentionContext(threading.local):
    """The state a step shares with the processors of one transformer.

    `active` is None on a dense step (every image token runs), else (B, n)
    indices of the image tokens that run.
    Thread-local: a call of the same transformer from another thread (e.g. a
    plain pipeline sharing it) sees its own, disabled context. The fields are set
    per instance, never as class attributes: dynamo before torch 2.13 reads a
    thread-local's class attributes instead of its values, and compiled blocks
    would silently run as if disabled.
    """

    def __reduce_ex__(self, protocol):
        raise TypeError("specdiff: an enabled model cannot be pickled (its caches and hooks are per process); "
                        "call specdiff.disable first, and enable again after loading")

    def __init__(self) -> None:
        self.enabled: bool = False
        self.real_phase: bool = False  # this call belongs to the real pass (not the speculative one)
        self.active: torch.Tensor | None = None
        self.kv_branch: int = -1  # which of each layer's LayerKV slots this call uses; -1: no key/value cache
        self.tap_queries: int = 0  # 0 = no taps this step
        self.tap_include_text: bool = False
        # (R, N) fp32 attention received by R rows of the batch (R < B: a CFG batch's conditional
        # half), summed over layers; None: no taps
        self.tap_sum: torch.Tensor | None = None
        self.tap_seconds: float = 0.0  # host time spent in taps this step (counted as scoring)
        self.timestep: float = 0.0  # of the transformer call in progress
        self.text_length: int = 0  # text tokens of the call in progress
        # (cos, sin) rows of the text and active image tokens of this step, for a family whose forward joins
        # its positions after the position module (FLUX.2); None when not picked
        self.positions: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None = None
        self.conditional_first: bool = False  # a CFG batch's conditional rows come first (the taps read them)


@dataclasses.dataclass
class LayerKV:
    """One attention layer's cached joint keys / values for one branch, (B, H, S, D) over image and text
    tokens in the layer's order. Held by the layer's processor (not looked up by name), so a compiled
    block sees the same code for every layer and no per-layer constant. Allocated by the first dense step
    of a shape and written in place after it (the same address every step)."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None


def joint_kv(ctx: AttentionContext, slots: list[LayerKV], image_key, image_value, text_key, text_value,
             text_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys / values of every image token and the text tokens, (B, H, S, D), refreshed where active.

    image_key / image_value: (B, H, n, D) of the active image tokens (n = N on dense steps);
    text_key / text_value: (B, H, T, D), or None when the layer has no text stream. A dense step writes
    every row into the slot's persistent buffer; a sparse step writes its active image rows and the text
    rows, so attention reads one persistent buffer per layer and nothing of size N is copied.
    """
    def joined(image, text):
        if text is None:
            return image
        return torch.cat([text, image] if text_first else [image, text], dim=2)

    if not ctx.enabled or ctx.kv_branch < 0:
        return joined(image_key, text_key), joined(image_value, text_value)
    slot = slots[ctx.kv_branch]
    text_length = 0 if text_key is None else text_key.shape[2]
    if ctx.active is None:  # dense: every image row, written into the persistent buffer
        batch, heads, _, dim = image_key.shape
        shape = (batch, heads, image_key.shape[2] + text_length, dim)
        if slot.keys is None or slot.keys.shape != shape or slot.keys.dtype != image_key.dtype \
                or slot.keys.device != image_key.device:
            slot.keys, slot.values = image_key.new_empty(shape), image_value.new_empty(shape)
    elif slot.keys is None:
        raise RuntimeError("sparse step before any dense step filled this layer's key/value cache")
    elif slot.keys.shape[0] != image_key.shape[0]:
        raise RuntimeError("batch size changed inside one generation")
    if ctx.active is None:
        if torch.is_grad_enabled() and (image_key.requires_grad or image_value.requires_grad):
            # a call that autograd records (a bare transformer outside no_grad): new tensors, as plain attention
            slot.keys, slot.values = joined(image_key, text_key), joined(image_value, text_value)
            return slot.keys, slot.values
        # one operator per tensor, as the plain concatenation, into the persistent buffer
        torch.cat([text_key, image_key] if text_first else [image_key, text_key], dim=2, out=slot.keys) \
            if text_key is not None else slot.keys.copy_(image_key)
        torch.cat([text_value, image_value] if text_first else [image_value, text_value], dim=2, out=slot.values) \
            if text_value is not None else slot.values.copy_(image_value)
        return slot.keys, slot.values
    image_start = text_length if text_first else 0
    image_length = slot.keys.shape[2] - text_length
    index = ctx.active[:, None, :, None].expand(-1, image_key.shape[1], -1, image_key.shape[-1])
    for cache, image, text in ((slot.keys, image_key, text_key), (slot.values, image_value, text_value)):
        cache.narrow(2, image_start, image_length).scatter_(2, index, image)
        if text is not None:
            cache.narrow(2, 0 if text_first else image_length, text_length).copy_(text)
    return slot.keys, slot.values


def tap_attention(
    ctx: AttentionContext,
    layer_offset: torch.Tensor,
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
    timed = not torch.compiler.is_compiling()  # a host timer inside traced code would break the graph
    tic = time.perf_counter() if timed else 0.0
    rows = ctx.tap_sum.shape[0]
    if rows < keys.shape[0]:  # views of the conditional rows (the last, or the first): nothing copied
        part = slice(0, rows) if ctx.conditional_first else slice(keys.shape[0] - rows, None)
        image_queries, keys = image_queries[part], keys[part]
        text_queries = None if text_queries is None else text_queries[part]
    n = image_queries.shape[2]
    m = min(ctx.tap_queries, n)
    if m == n:
        queries = image_queries  # every query (e.g. a sparse step's few active tokens): no copy
    else:
        # layer_offset: a per-layer integer held as a 0-d tensor, so compiled code is the same for every layer
        offset = layer_offset % max(n // m, 1)  # a 0-d CPU tensor combines with any device's
        picks = (torch.arange(m, device=image_queries.device) * (n // m) + offset) % n
        queries = image_queries[:, :, picks]
    if ctx.tap_include_text and text_queries is not None:
        queries = torch.cat([queries, text_queries], dim=2)
    scale = scale if scale is not None else 1.0 / math.sqrt(queries.shape[-1])
    # logits in the model's dtype with the scale folded into the few queries (no fp32 copy of all keys);
    # the softmax and the sums in fp32, in chunks of heads and queries so that the fp32 weights stay under
    # the device's chunk size whatever tap_queries and the sequence length are
    batch, heads, count, _ = queries.shape
    cpu = keys.device.type == "cpu"
    budget = TAP_CHUNK_ELEMENTS_CPU if cpu else TAP_CHUNK_ELEMENTS
    per_query = batch * keys.shape[2]  # weights of one query of one head
    query_chunk = max(1, min(count, budget // per_query))
    head_chunk = max(1, min(heads, budget // (per_query * query_chunk)))
    # on a CPU the chunks' logits and fp32 weights are written into two buffers kept for the layer's
    # chunks, not allocated per chunk: the taps alone 1.4-2x faster (BENCHMARKS.md section 12)
    buffers = None
    if cpu and keys.dtype == torch.float32 and not torch.compiler.is_compiling():
        size = batch * head_chunk * query_chunk * keys.shape[2]
        buffers = (keys.new_empty(size), keys.new_empty(size))
    received = None
    for head in range(0, heads, head_chunk):
        head_keys = keys if head_chunk == heads else keys[:, head : head + head_chunk]
        head_queries = queries if head_chunk == heads else queries[:, head : head + head_chunk]
        for start in range(0, count, query_chunk):
            part = head_queries[:, :, start : start + query_chunk] * scale
            if buffers is None:
                weights = torch.softmax((part @ head_keys.transpose(-1, -2)).float(), dim=-1)
            else:
                shape = (*part.shape[:-1], keys.shape[2])
                numel = math.prod(shape)
                logits = torch.matmul(part, head_keys.transpose(-1, -2), out=buffers[0][:numel].view(shape))
                weights = torch.ops.aten._softmax.out(logits, -1, False, out=buffers[1][:numel].view(shape))
            summed = weights.sum(dim=(1, 2))[:, image_key_slice]
            received = summed if received is None else received + summed
    ctx.tap_sum.add_(received / heads)  # heads averaged, queries summed; the buffer is the step's (begin_step)
    if timed:
        ctx.tap_seconds += time.perf_counter() - tic
