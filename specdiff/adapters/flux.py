"""FLUX (diffusers FluxTransformer2DModel): double-stream then single-stream blocks.

Tokens are ordered [text, image]. Positions are rotary (RoPE) and applied
inside attention, so the adapter gathers the RoPE rows of the active image
tokens (one set per batch row) and the processor caches rotated keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from specdiff.adapters.base import Adapter, gather_tokens, on_tokens, timestep_value
from specdiff.engine.attention import AttentionContext, merge_image_kv, tap_attention


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
    batch = active.shape[0]
    return tuple(
        torch.cat([t[:text_len].expand(batch, -1, -1), gather_tokens(t[text_len:].expand(batch, -1, -1), active)], 1)
        for t in rope
    )


class FluxTokenCachingProcessor:
    """FluxAttnProcessor's math, with image keys/values read from the engine's cache.

    Double blocks pass image and text separately; single blocks pass the
    joint [text, image] sequence, split here at the text length.
    """

    def __init__(self, context: AttentionContext, layer_name: str, layer_index: int, adapter: "FluxAdapter") -> None:
        self.context = context
        self.layer_name = layer_name
        self.layer_index = layer_index
        self.adapter = adapter

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        ctx = self.context
        if attention_mask is not None:
            raise NotImplementedError("specdiff does not accelerate FLUX with an attention mask")
        text_len = self.adapter.text_length
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
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D)
        if ctx.enabled:
            image_k, image_v = merge_image_kv(ctx, self.layer_name, k[:, :, text_len:], v[:, :, text_len:])
            k = torch.cat([k[:, :, :text_len], image_k], 2)
            v = torch.cat([v[:, :, :text_len], image_v], 2)
            tap_attention(ctx, self.layer_index, q[:, :, text_len:], q[:, :, :text_len], k, slice(text_len, None))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if joint_input:
            return out
        text_out, image_out = out[:, :text_len], out[:, text_len:]
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


class FluxAdapter(Adapter):
    model_types = (FluxTransformer2DModel,)
    family = "flux"

    def __init__(self, model, runtime) -> None:
        super().__init__(model, runtime)
        self.text_length = 0

    def make_processor(self, layer_name: str, layer_index: int):
        return FluxTokenCachingProcessor(self.runtime.context, layer_name, layer_index, self)

    def accelerated_forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        pooled_projections: torch.Tensor = None,
        timestep: torch.LongTensor = None,
        img_ids: torch.Tensor = None,
        txt_ids: torch.Tensor = None,
        guidance: torch.Tensor = None,
        joint_attention_kwargs: dict | None = None,
        controlnet_block_samples=None,
        controlnet_single_block_samples=None,
        return_dict: bool = True,
        controlnet_blocks_repeat: bool = False,
    ):
        model = self.model
        if controlnet_block_samples is not None or controlnet_single_block_samples is not None:
            raise NotImplementedError("specdiff does not accelerate FLUX with ControlNet yet")
        if joint_attention_kwargs and "ip_adapter_image_embeds" in joint_attention_kwargs:
            raise NotImplementedError("specdiff does not accelerate FLUX with an IP-Adapter yet")
        tokens = model.x_embedder(hidden_states)
        timestep = timestep.to(tokens.dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(tokens.dtype) * 1000
            temb = model.time_text_embed(timestep, guidance, pooled_projections)
        else:
            temb = model.time_text_embed(timestep, pooled_projections)
        text = model.context_embedder(encoder_hidden_states)
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        cos, sin = model.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        self.text_length = text_len = text.shape[1]
        batch, num_tokens = tokens.shape[:2]
        active = self.runtime.begin_step(timestep_value(timestep), batch, num_tokens, tokens.device)
        full_rope = (cos, sin)
        rope = rope_rows(full_rope, text_len, active)
        tokens = gather_tokens(tokens, active)
        kwargs = joint_attention_kwargs or {}
        blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
        context = self.runtime.context

        def runner(block):
            # as in the SD3 adapter; a per-block subset also needs its RoPE rows
            return lambda x, c, active=None: on_tokens(context, active, lambda: block(
                hidden_states=x, encoder_hidden_states=c, temb=temb,
                image_rotary_emb=rope if active is None else rope_rows(full_rope, text_len, active),
                joint_attention_kwargs=kwargs))

        for index, block in enumerate(blocks):
            text, tokens = self.runtime.run_block(index, len(blocks), runner(block), tokens, text)
        output = model.proj_out(model.norm_out(tokens, temb))
        output = self.runtime.end_step(output)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
