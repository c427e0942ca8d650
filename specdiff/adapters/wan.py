"""Wan 2.1 / 2.2 text-to-video (diffusers WanTransformer3DModel): self-attention over the video tokens with
3-D RoPE (frame, height, width), cross-attention to the text, blocks that return the video stream only.

The RoPE rows are computed before the patch embedding, whose output is a 5-D grid flattened by the stock
forward, so this family plans its step at the RoPE module (the latents' shape gives the token count),
picks the rows of the tokens that run there, and gathers those tokens just before the first block.
Self-attention reads the keys / values of every video token from the cache; cross-attention runs the
stock math on the active queries. WanPipeline runs classifier-free guidance as a second call per step
(`cache_context("uncond")`): its own branch. Wan 2.2 A14B's second transformer (`transformer_2`, the
low-noise steps) gets its own adapter and engine state from `enable`. Refused: image-to-video inputs
(`encoder_hidden_states_image`) and per-token timesteps (Wan 2.2 TI2V).
"""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from specdiff.adapters.base import Adapter, TokenCachingProcessor
from specdiff.engine.attention import joint_kv, tap_attention
from specdiff.engine.tokens import gather_tokens


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, D) rotated by (., S, 1, D) cos / sin rows, interleaved pairs (WanAttnProcessor's math)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def rope_rows(rope, active: torch.Tensor):
    """The (cos, sin) rows (1, N, 1, D) of the tokens `active` (B, n), per batch row: (B, n, 1, D)."""
    if rope[0].shape[0] != 1:
        raise RuntimeError("RoPE rows were already picked for this step's tokens; cannot pick a subset of them")
    batch = active.shape[0]
    return tuple(gather_tokens(t.squeeze(2).expand(batch, -1, -1), active).unsqueeze(2) for t in rope)


class WanTokenCachingProcessor(TokenCachingProcessor):
    """WanAttnProcessor's math; self-attention with the video keys / values from the engine's cache,
    cross-attention as the stock processor. Attention through diffusers' dispatcher."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cross = WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None:  # cross-attention: the active queries against every text token
            self.cross._attention_backend = self._attention_backend
            return self.cross(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if attention_mask is not None:
            raise NotImplementedError("specdiff does not accelerate Wan self-attention with an attention mask")
        ctx = self.context
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        if rotary_emb is not None:  # the active tokens' rows (picked once per step, outside the blocks)
            query, key = rotate(query, *rotary_emb), rotate(key, *rotary_emb)
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))  # (B, H, S, D)
        key, value = joint_kv(ctx, self.kv_slots, key, value, None, None, text_first=False)  # every video token
        if ctx.enabled:
            tap_attention(ctx, self.tap_offset, query, None, key, slice(0, None))
        out = dispatch_attention_fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                    attn_mask=None, dropout_p=0.0, is_causal=False, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class WanAdapter(Adapter):
    """Wan: a 3-D patch embedding, blocks of self-attention (3-D RoPE), cross-attention and an MLP."""

    model_types = (WanTransformer3DModel,)
    embed_module = "patch_embedding"  # its 5-D output is flattened by the stock forward: gathered at the first block
    head_module = "proj_out"
    position_module = "rope"  # runs first: the step is planned here
    block_lists = ("blocks",)
    blocks_return_text = False
    refused_arguments = {"encoder_hidden_states_image": "image-to-video inputs"}

    def refuse_call(self, arguments: dict) -> str | None:
        timestep = arguments.get("timestep")
        if isinstance(timestep, torch.Tensor) and timestep.ndim == 2:
            return "per-token timesteps (Wan 2.2 TI2V)"
        return None

    @staticmethod
    def cfg_groups(arguments: dict) -> int:
        # WanPipeline runs the negative prompt as a second call per step, never batched
        return 1

    def without_cfg(self, arguments: dict) -> dict:
        changes = {"guidance_scale": 1.0, "guidance_scale_2": None}
        changes.update({key: None for key in ("negative_prompt", "negative_prompt_embeds") if arguments.get(key) is not None})
        return changes

    def image_tokens(self, arguments: dict) -> int:
        frames, height, width = arguments["hidden_states"].shape[2:]
        p_t, p_h, p_w = self.model.config.patch_size
        return (frames // p_t) * (height // p_h) * (width // p_w)

    def make_processor(self, kv_slots, layer_index: int):
        return WanTokenCachingProcessor(self.runtime.context, kv_slots, layer_index)

    def positions_of(self, positions, active: torch.Tensor):
        return rope_rows(positions, active)

    def block_arguments(self, arguments: dict, active: torch.Tensor) -> dict:
        rope = arguments.get("rotary_emb")
        return arguments if rope is None else {**arguments, "rotary_emb": rope_rows(rope, active)}

    # -- hooks: plan at the RoPE module, gather before the first block ------------------------------
    def step_hooks(self, model) -> list:
        return [model.get_submodule(self.position_module).register_forward_hook(self._plan_at_positions),
                model.blocks[0].register_forward_pre_hook(self._gather_tokens, with_kwargs=True),
                model.get_submodule(self.head_module).register_forward_hook(self._on_head)]

    def _plan_at_positions(self, module, args, positions):
        latents = args[0]  # (B, C, F, H, W)
        count = self.image_tokens({"hidden_states": latents})
        active = self.runtime.begin_step(self.runtime.context.timestep, latents.shape[0], count, latents.device)
        return positions if active is None else rope_rows(positions, active)

    def _gather_tokens(self, module, args, kwargs):
        context = self.runtime.context
        if not context.enabled or context.active is None:
            return None
        if args:
            return (gather_tokens(args[0], context.active), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": gather_tokens(kwargs["hidden_states"], context.active)}
