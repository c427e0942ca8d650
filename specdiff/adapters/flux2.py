"""FLUX.2 (diffusers Flux2Transformer2DModel: FLUX.2 [dev] and [klein]): double-stream blocks, then
"parallel" single-stream blocks whose attention and MLP share one input projection.

Tokens are ordered [text, image]. RoPE over four axes is applied inside attention; the stock forward
embeds the image and the text positions in two calls of `pos_embed` and joins them itself, so the
adapter picks the rows of the text and of the image tokens that run once per step, at the second call,
and the processors use them on that step instead of the joined rows of every token. Between the
blocks the forward joins the streams; a block-level method sees each single block split back into
(text, image) through the block's own `split_hidden_states`. Guidance is embedded ([dev]) or a second
transformer call per step (Flux2KleinPipeline's `cache_context("uncond")`): its own branch.
Refused: reference images (`image=` in the pipeline call: edit and multi-reference generation) and the
Klein key/value-cache pipeline's `kv_cache`.
"""

from __future__ import annotations

import threading

import torch
from diffusers import Flux2Transformer2DModel
from diffusers.models.transformers.transformer_flux2 import Flux2SingleTransformerBlock

from specdiff.adapters.base import Adapter, TokenCachingProcessor
from specdiff.adapters.flux import apply_rope, attend_text_first, rope_rows


class Flux2TokenCachingProcessor(TokenCachingProcessor):
    """Flux2AttnProcessor's and Flux2ParallelSelfAttnProcessor's math, with image keys / values read from
    the engine's cache. Attention through diffusers' dispatcher (`set_attention_backend` is honoured)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, *streams):
        # double blocks call (attn, x, text, mask, rope); single blocks (attn, x, mask, rope)
        ctx = self.context
        parallel = hasattr(attn, "to_qkv_mlp_proj")
        if parallel:
            encoder_hidden_states, (attention_mask, image_rotary_emb) = None, (list(streams) + [None, None])[:2]
        else:
            encoder_hidden_states, attention_mask, image_rotary_emb = (list(streams) + [None, None, None])[:3]
        if attention_mask is not None:
            raise NotImplementedError("specdiff does not accelerate FLUX.2 with an attention mask")
        mlp = None
        if parallel:  # single block: [text, image] in one sequence, attention and MLP from one projection
            projected = attn.to_qkv_mlp_proj(hidden_states)
            qkv_dim = 3 * attn.inner_dim
            local_qkv = projected.shape[-1] * qkv_dim // (qkv_dim + attn.mlp_hidden_dim * attn.mlp_mult_factor)
            qkv, mlp = torch.split(projected, [local_qkv, projected.shape[-1] - local_qkv], dim=-1)
            q, k, v = qkv.chunk(3, dim=-1)
            text_len = ctx.text_length
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q = attn.norm_q(q.unflatten(-1, (-1, attn.head_dim)))
        k = attn.norm_k(k.unflatten(-1, (-1, attn.head_dim)))
        v = v.unflatten(-1, (-1, attn.head_dim))
        if not parallel:
            tq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            tk = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            tv = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            q, k, v = torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1)
            text_len = encoder_hidden_states.shape[1]
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb
            if ctx.enabled and ctx.positions is not None:  # a sparse step: the rows of its tokens, in their order
                cos, sin = ctx.positions
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend_text_first(self, q, k, v, text_len)
        if parallel:
            return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))
        text_out, image_out = out[:, :text_len], out[:, text_len:]
        return attn.to_out[1](attn.to_out[0](image_out)), attn.to_add_out(text_out)


class Flux2Adapter(Adapter):
    """FLUX.2: a linear image embedding, double- then parallel single-stream blocks, four-axis RoPE."""

    model_types = (Flux2Transformer2DModel,)
    embed_module = "x_embedder"
    head_module = "proj_out"
    position_module = "pos_embed"  # called for the image ids, then for the text ids
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    timestep_scale = 1000.0  # Flux2 pipelines pass t / 1000
    refused_arguments = {"kv_cache": "a reference key/value cache (Flux2KleinKVPipeline)",
                         "kv_cache_mode": "a reference key/value cache (Flux2KleinKVPipeline)"}
    refused_pipeline_arguments = {"image": "reference images (editing, multi-reference generation)"}

    def __init__(self, model, runtime) -> None:
        super().__init__(model, runtime)
        self._pending = threading.local()  # the image ids' rows of this step, until the text ids' call

    @staticmethod
    def cfg_groups(arguments: dict) -> int:
        return 1  # embedded guidance, or a second call per step

    def without_cfg(self, arguments: dict) -> dict:
        changes = super().without_cfg(arguments)
        # without a guidance embedding ([klein]) guidance_scale > 1 is classifier-free guidance, a second
        # call per step; with one ([dev]) it is the embedded guidance and stays as given
        if not self.model.config.guidance_embeds and (arguments.get("guidance_scale") or 1.0) > 1.0:
            changes["guidance_scale"] = 1.0
        return changes

    def image_tokens(self, arguments: dict) -> int:
        return arguments["hidden_states"].shape[1]

    def make_processor(self, kv_slots, layer_index: int):
        return Flux2TokenCachingProcessor(self.runtime.context, kv_slots, layer_index)

    def _on_embed(self, module, args, tokens):
        self._pending.image = None
        self.runtime.context.positions = None
        return super()._on_embed(module, args, tokens)

    def _on_positions(self, module, args, positions):
        # first call: the image ids; second: the text ids. The forward joins them as [text, image];
        # the rows of the tokens that run are picked here once per step, outside the compiled blocks.
        context = self.runtime.context
        if not context.enabled or context.active is None:
            return positions
        image = getattr(self._pending, "image", None)
        if image is None:
            self._pending.image = positions
            return positions
        self._pending.image = None
        joined = tuple(torch.cat([text, rows], 0) for text, rows in zip(positions, image))
        context.positions = rope_rows(joined, positions[0].shape[0], context.active)
        return positions

    def block_arguments(self, arguments: dict, active: torch.Tensor) -> dict:
        rope = arguments.get("image_rotary_emb")
        if rope is None:
            return arguments
        return {**arguments, "image_rotary_emb": rope_rows(rope, self.runtime.context.text_length, active)}

    def block_streams(self, block, arguments):
        """A single block takes the joined [text, image] sequence; block-level methods see it split (the
        block's own `split_hidden_states`) and the forward gets it joined back."""
        tokens, text, arguments, rejoin = super().block_streams(block, arguments)
        if not isinstance(block, Flux2SingleTransformerBlock) or text is not None:
            return tokens, text, arguments, rejoin
        text_length = self.runtime.context.text_length
        arguments = {**arguments, "split_hidden_states": True, "text_seq_len": None}
        return tokens[:, text_length:], tokens[:, :text_length], arguments, lambda c, x: torch.cat([c, x], dim=1)
