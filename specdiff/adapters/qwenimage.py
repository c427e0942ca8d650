"""Qwen-Image (diffusers QwenImageTransformer2DModel): double-stream blocks, joint attention [text, image].

Positions are rotary (complex frequencies) and applied inside attention, so the adapter picks the rows
of the image tokens that run once per step (from `pos_embed`'s output) and the processor rotates the
active queries and keys with them. The text mask (`encoder_hidden_states_mask`) covers the text keys;
every image key is valid. Classifier-free guidance is a second transformer call per step
(QwenImagePipeline's `true_cfg_scale` with a negative prompt): its own branch.
Refused: the edit models' conditioning (`zero_cond_t`), layered 3-D RoPE, several images per sample
(the edit pipelines' reference images), ControlNet.
"""

from __future__ import annotations

import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn

from specdiff.adapters.base import Adapter, TokenCachingProcessor
from specdiff.engine.attention import joint_kv, tap_attention
from specdiff.engine.tokens import gather_tokens


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, D) rotated by complex frequencies (S, D/2) shared or (B, S, D/2) per row, as Qwen-Image."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs.unsqueeze(-2)).flatten(3).type_as(x)


def image_rows(rope, active: torch.Tensor):
    """(image frequencies of the active tokens, per batch row; text frequencies)."""
    image, text = rope
    if image.dim() != 2:
        raise RuntimeError("RoPE rows were already picked for this step's tokens; cannot pick a subset of them")
    return gather_tokens(image.expand(active.shape[0], -1, -1), active), text


class QwenImageTokenCachingProcessor(TokenCachingProcessor):
    """QwenDoubleStreamAttnProcessor2_0's math, with image keys/values read from the engine's cache; attention
    through diffusers' dispatcher, so `set_attention_backend` is honoured."""

    _attention_backend = None
    _parallel_config = None


    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        ctx = self.context
        if encoder_hidden_states is None or attention_mask is not None:
            raise NotImplementedError("specdiff accelerates Qwen-Image's joint attention with its text mask only")
        head_dim = attn.inner_dim // attn.heads

        def heads(x):
            return x.unflatten(-1, (-1, head_dim))

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        tq = heads(attn.add_q_proj(encoder_hidden_states))
        tk, tv = heads(attn.add_k_proj(encoder_hidden_states)), heads(attn.add_v_proj(encoder_hidden_states))
        q = q if attn.norm_q is None else attn.norm_q(q)
        k = k if attn.norm_k is None else attn.norm_k(k)
        tq = tq if attn.norm_added_q is None else attn.norm_added_q(tq)
        tk = tk if attn.norm_added_k is None else attn.norm_added_k(tk)
        if image_rotary_emb is not None:  # the image rows are the active tokens' (picked outside the blocks)
            image_freqs, text_freqs = image_rotary_emb
            q, k = rotate(q, image_freqs), rotate(k, image_freqs)
            tq, tk = rotate(tq, text_freqs), rotate(tk, text_freqs)
        q, k, v, tq, tk, tv = (x.transpose(1, 2) for x in (q, k, v, tq, tk, tv))  # (B, H, S, D)
        text_length = tk.shape[2]
        key, value = joint_kv(ctx, self.kv_slots, k, v, tk, tv, text_first=True)  # [text, every image token]
        if ctx.enabled:
            tap_attention(ctx, self.tap_offset, q, tq, key, slice(text_length, None))
        mask = None
        if encoder_hidden_states_mask is not None:
            image_keys = torch.ones(key.shape[0], key.shape[2] - text_length, dtype=torch.bool, device=key.device)
            mask = torch.cat([encoder_hidden_states_mask.bool(), image_keys], dim=1)[:, None, None, :]
        joint_query = torch.cat([tq, q], dim=2)
        out = dispatch_attention_fn(joint_query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                    attn_mask=mask, dropout_p=0.0, is_causal=False, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(joint_query.dtype)
        text_out, image_out = out[:, :text_length], out[:, text_length:]
        image_out = attn.to_out[0](image_out.contiguous())
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)
        return image_out, attn.to_add_out(text_out.contiguous())


class QwenImageAdapter(Adapter):
    """Qwen-Image: a linear image embedding, double-stream blocks, complex RoPE inside attention."""

    model_types = (QwenImageTransformer2DModel,)
    embed_module = "img_in"
    head_module = "proj_out"
    position_module = "pos_embed"  # (image, text) rotary frequencies, applied inside attention
    block_lists = ("transformer_blocks",)
    timestep_scale = 1000.0  # QwenImagePipeline passes t / 1000
    refused_arguments = {"controlnet_block_samples": "ControlNet", "additional_t_cond": "additional timestep conditions"}

    @classmethod
    def unsupported(cls, model) -> str | None:
        if getattr(model, "zero_cond_t", False):
            return "with zero_cond_t (the edit models' reference-image conditioning) is not accelerated yet"
        if getattr(model.config, "use_layer3d_rope", False):
            return "with layered 3-D RoPE (the layered models) is not accelerated yet"
        return None

    def refuse_call(self, arguments: dict) -> str | None:
        shapes = arguments.get("img_shapes")
        if isinstance(shapes, list) and any(isinstance(s, list) and len(s) > 1 for s in shapes):
            return "several images per sample (an edit pipeline's reference images)"
        return None

    @staticmethod
    def cfg_groups(arguments: dict) -> int:
        # QwenImagePipeline runs the negative prompt as a second call per step (true CFG), never batched
        return 1

    def image_tokens(self, arguments: dict) -> int:
        return arguments["hidden_states"].shape[1]  # packed: (B, N, C)

    def make_processor(self, kv_slots, layer_index: int):
        return QwenImageTokenCachingProcessor(self.runtime.context, kv_slots, layer_index)

    def positions_of(self, positions, active: torch.Tensor):
        return image_rows(positions, active)

    def block_arguments(self, arguments: dict, active: torch.Tensor) -> dict:
        rope = arguments.get("image_rotary_emb")
        return arguments if rope is None else {**arguments, "image_rotary_emb": image_rows(rope, active)}
