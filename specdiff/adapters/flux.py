"""FLUX (diffusers FluxTransformer2DModel): double-stream then single-stream blocks.

Tokens are ordered [text, image]. Positions are rotary (RoPE) and applied
inside attention, so the processor picks the RoPE rows of the active image
tokens (one set per batch row) and caches rotated keys.
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn

from specdiff.adapters.base import Adapter, TokenCachingProcessor
from specdiff.engine.tokens import gather_tokens
from specdiff.engine.attention import joint_kv, tap_attention


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, D); cos/sin (S, D) shared or (B, S, D) per row. Interleaved pairs, as FLUX."""
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def rope_rows(rope, text_len: int, active: torch.Tensor | None):
    """RoPE (cos, sin) rows of all text tokens and of the active image tokens, per batch row."""
    if active is None:
        return rope
    if rope[0].dim() != 2:  # (B, S, D): already the rows of a subset of tokens
        raise RuntimeError("RoPE rows were already picked for this step's tokens; cannot pick a subset of them")
    batch = active.shape[0]
    return tuple(
        torch.cat([t[:text_len].expand(batch, -1, -1), gather_tokens(t[text_len:].expand(batch, -1, -1), active)], 1)
        for t in rope
    )


def attend_text_first(processor, q, k, v, text_len: int) -> torch.Tensor:
    """Attention over a [text, image] sequence (q, k, v: (B, S, H, D), positions applied), with the image
    keys / values of every token from the engine's cache and the taps; (B, S, H * D) in q's dtype. Shared
    by the FLUX.1 and FLUX.2 processors (diffusers' dispatcher: `set_attention_backend` is honoured)."""
    ctx = processor.context
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D)
    if ctx.enabled and ctx.kv_branch >= 0:  # joint order [text, image]; image keys of every token on sparse steps
        k, v = joint_kv(ctx, processor.kv_slots, k[:, :, text_len:], v[:, :, text_len:], k[:, :, :text_len],
                        v[:, :, :text_len], text_first=True)
    if ctx.enabled:
        tap_attention(ctx, processor.tap_offset, q[:, :, text_len:], q[:, :, :text_len], k, slice(text_len, None))
    out = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                backend=processor._attention_backend, parallel_config=processor._parallel_config)
    return out.flatten(2, 3).to(q.dtype)


class FluxTokenCachingProcessor(TokenCachingProcessor):
    """FluxAttnProcessor's math, with image keys/values read from the engine's cache.

    Double blocks pass image and text separately; single blocks pass the
    joint [text, image] sequence, split here at the text length. RoPE comes
    in with the rows of the tokens that run (the adapter picks them once per
    step, outside the compiled blocks). Attention goes through diffusers'
    dispatcher, so `set_attention_backend` is honoured.
    """

    _attention_backend = None
    _parallel_config = None


    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        ctx = self.context
        if attention_mask is not None:
            raise NotImplementedError("specdiff does not accelerate FLUX with an attention mask")
        text_len = ctx.text_length
        if attn.fused_projections:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q = attn.norm_q(q.unflatten(-1, (-1, attn.head_dim)))
        k = attn.norm_k(k.unflatten(-1, (-1, attn.head_dim)))
        v = v.unflatten(-1, (-1, attn.head_dim))
        joint_input = encoder_hidden_states is None
        if not joint_input:
            if attn.fused_projections:
                tq, tk, tv = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                tq = attn.add_q_proj(encoder_hidden_states)
                tk = attn.add_k_proj(encoder_hidden_states)
                tv = attn.add_v_proj(encoder_hidden_states)
            tq = attn.norm_added_q(tq.unflatten(-1, (-1, attn.head_dim)))
            tk = attn.norm_added_k(tk.unflatten(-1, (-1, attn.head_dim)))
            tv = tv.unflatten(-1, (-1, attn.head_dim))
            q, k, v = torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1)
            text_len = encoder_hidden_states.shape[1]
        if image_rotary_emb is not None:  # the rows of this call's tokens: FluxAdapter picks them outside the blocks
            cos, sin = image_rotary_emb
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend_text_first(self, q, k, v, text_len)
        if joint_input:
            return out
        text_out, image_out = out[:, :text_len], out[:, text_len:]
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


class FluxAdapter(Adapter):
    """FLUX.1: a linear image embedding, double- then single-stream blocks, RoPE inside attention."""

    model_types = (FluxTransformer2DModel,)
    embed_module = "x_embedder"
    head_module = "proj_out"
    position_module = "pos_embed"  # RoPE of every token, applied inside attention
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    timestep_scale = 1000.0  # FluxPipeline passes t / 1000
    refused_arguments = {"controlnet_block_samples": "ControlNet", "controlnet_single_block_samples": "ControlNet"}

    @staticmethod
    def cfg_groups(arguments: dict) -> int:
        # FLUX pipelines never batch [uncond, cond]: guidance is embedded, and true CFG is a second call
        return 1

    def image_tokens(self, arguments: dict) -> int:
        return arguments["hidden_states"].shape[1]  # packed: (B, N, C)

    def make_processor(self, kv_slots, layer_index: int):
        return FluxTokenCachingProcessor(self.runtime.context, kv_slots, layer_index)

    def positions_of(self, positions, active: torch.Tensor):
        return rope_rows(positions, self.runtime.context.text_length, active)

    def block_arguments(self, arguments: dict, active: torch.Tensor) -> dict:
        rope = arguments.get("image_rotary_emb")
        if rope is None:
            return arguments
        return {**arguments, "image_rotary_emb": rope_rows(rope, self.runtime.context.text_length, active)}
