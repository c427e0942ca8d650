"""SD3 / SD3.5 (diffusers SD3Transformer2DModel), and the project's embedded model.

Joint attention orders tokens [image, text]. Positions are added at patch
embedding, so gathered image tokens carry them. SD3.5's dual-attention
blocks (attn2: image-only self-attention) get the same key/value cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel

from specdiff.adapters.base import Adapter, TokenCachingProcessor
from specdiff.engine.attention import joint_kv, tap_attention


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, inner = x.shape
    return x.view(batch, length, heads, inner // heads).transpose(1, 2)


def _qkv(x, heads, projections, norms):
    """(B, H, S, D) query, key, value of one stream; q and k normalised when the layer has norms."""
    q, k, v = (_heads(proj(x), heads) for proj in projections)
    norm_q, norm_k = norms
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v


class SD3TokenCachingProcessor(TokenCachingProcessor):
    """JointAttnProcessor2_0's math, with image keys/values read from the engine's cache."""


    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        ctx = self.context
        heads = attn.heads
        query, key, value = _qkv(hidden_states, heads, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k))
        text_query = text_key = text_value = None
        if encoder_hidden_states is not None:
            text_query, text_key, text_value = _qkv(
                encoder_hidden_states, heads, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                (attn.norm_added_q, attn.norm_added_k),
            )
        # joint order [image, text]; on a sparse step the keys of every image token, from the cache
        key, value = joint_kv(ctx, self.kv_slots, key, value, text_key, text_value, text_first=False)
        num_image_keys = key.shape[2] - (0 if text_key is None else text_key.shape[2])
        if ctx.enabled:
            tap_attention(ctx, self.tap_offset, query, text_query, key, slice(0, num_image_keys))
        num_image_queries = query.shape[2]
        if text_query is not None:
            query = torch.cat([query, text_query], dim=2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(out.shape[0], -1, heads * out.shape[-1]).to(query.dtype)
        image_out = attn.to_out[1](attn.to_out[0](out[:, :num_image_queries]))
        if encoder_hidden_states is None:
            return image_out
        text_out = out[:, num_image_queries:]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return image_out, text_out


class SD3Adapter(Adapter):
    """SD3 / SD3.5 / the embedded model: patch embedding with positions, joint blocks, a linear head."""

    model_types = (SD3Transformer2DModel,)
    embed_module = "pos_embed"  # positions are added here, so gathered tokens keep theirs
    head_module = "proj_out"
    block_lists = ("transformer_blocks",)
    refused_arguments = {"block_controlnet_hidden_states": "ControlNet", "skip_layers": "skip_layers"}

    @staticmethod
    def cfg_groups(arguments: dict) -> int:
        # every SD3-family pipeline (and the embedded model's) batches [uncond, cond] when guidance_scale > 1
        scale = arguments.get("guidance_scale")
        return 2 if scale is not None and scale > 1 else 1

    def image_tokens(self, arguments: dict) -> int:
        height, width = arguments["hidden_states"].shape[-2:]
        patch = self.model.config.patch_size
        return (height // patch) * (width // patch)

    def make_processor(self, kv_slots, layer_index: int):
        return SD3TokenCachingProcessor(self.runtime.context, kv_slots, layer_index)
