"""SD3 / SD3.5 (diffusers SD3Transformer2DModel), and the project's embedded model.

Joint attention orders tokens [image, text]. Positions are added at patch
embedding, so gathered image tokens carry them. SD3.5's dual-attention
blocks (attn2: image-only self-attention) get the same key/value cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from specdiff.adapters.base import Adapter, gather_tokens, on_tokens, timestep_value
from specdiff.engine.attention import AttentionContext, merge_image_kv, tap_attention


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, inner = x.shape
    return x.view(batch, length, heads, inner // heads).transpose(1, 2)


def _qkv(x, heads, projections, norms):
    """(B, H, S, D) query, key, value of one stream; q and k normalised when the layer has norms."""
    q, k, v = (_heads(proj(x), heads) for proj in projections)
    norm_q, norm_k = norms
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v


class SD3TokenCachingProcessor:
    """JointAttnProcessor2_0's math, with image keys/values read from the engine's cache."""

    def __init__(self, context: AttentionContext, layer_name: str, layer_index: int) -> None:
        self.context = context
        self.layer_name = layer_name
        self.layer_index = layer_index

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        ctx = self.context
        heads = attn.heads
        query, key, value = _qkv(hidden_states, heads, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k))
        if ctx.enabled:
            key, value = merge_image_kv(ctx, self.layer_name, key, value)
        num_image_keys = key.shape[2]
        text_query = None
        if encoder_hidden_states is not None:
            text_query, text_key, text_value = _qkv(
                encoder_hidden_states, heads, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                (attn.norm_added_q, attn.norm_added_k),
            )
            key = torch.cat([key, text_key], dim=2)
            value = torch.cat([value, text_value], dim=2)
        if ctx.enabled:
            tap_attention(ctx, self.layer_index, query, text_query, key, slice(0, num_image_keys))
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
    model_types = (SD3Transformer2DModel,)
    family = "sd3"

    def make_processor(self, layer_name: str, layer_index: int):
        return SD3TokenCachingProcessor(self.runtime.context, layer_name, layer_index)

    def accelerated_forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        pooled_projections: torch.Tensor = None,
        timestep: torch.Tensor = None,
        block_controlnet_hidden_states: list | None = None,
        joint_attention_kwargs: dict | None = None,
        return_dict: bool = True,
        skip_layers: list[int] | None = None,
    ):
        model = self.model
        if block_controlnet_hidden_states is not None or skip_layers:
            raise NotImplementedError("specdiff does not accelerate SD3 with ControlNet or skip_layers yet")
        if joint_attention_kwargs and "ip_adapter_image_embeds" in joint_attention_kwargs:
            raise NotImplementedError("specdiff does not accelerate SD3 with an IP-Adapter yet")
        height, width = hidden_states.shape[-2:]
        tokens = model.pos_embed(hidden_states).contiguous()  # positions added here
        temb = model.time_text_embed(timestep, pooled_projections)
        text = model.context_embedder(encoder_hidden_states)
        batch, num_tokens = tokens.shape[:2]
        active = self.runtime.begin_step(timestep_value(timestep), batch, num_tokens, tokens.device)
        tokens = gather_tokens(tokens, active)
        blocks = model.transformer_blocks
        context = self.runtime.context

        def runner(block):
            # block(x, c, active) runs it on image tokens x; `active` names them when a
            # block-level policy (ToCa) runs a subset of the tokens of a dense step
            return lambda x, c, active=None: on_tokens(context, active, lambda: block(
                hidden_states=x, encoder_hidden_states=c, temb=temb, joint_attention_kwargs=joint_attention_kwargs))

        for index, block in enumerate(blocks):
            text, tokens = self.runtime.run_block(index, len(blocks), runner(block), tokens, text)
        tokens = model.proj_out(model.norm_out(tokens, temb))
        tokens = self.runtime.end_step(tokens)
        patch = model.config.patch_size
        grid_h, grid_w = height // patch, width // patch
        tokens = tokens.reshape(batch, grid_h, grid_w, patch, patch, model.out_channels)
        output = torch.einsum("nhwpqc->nchpwq", tokens).reshape(batch, model.out_channels, height, width)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
