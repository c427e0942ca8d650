"""Z-Image (diffusers ZImageTransformer2DModel): single-stream blocks over one sequence [image, caption].

The stock forward takes lists (one latent and one caption per sample), embeds the image tokens (padded
to a multiple of 32) and refines them in `noise_refiner` layers, refines the caption in
`context_refiner` layers, joins both per sample into one padded sequence with a key mask, runs the main
`layers`, then the final layer over the whole sequence. The engine's step spans the main layers: it is
planned at the caption embedding (outside the compiled blocks: the call's sizes are known there), the
image tokens that run are gathered just before the first main layer (traceable: a gather), each
layer's processor picks the RoPE rows of the tokens it runs, and the image rows of the final layer's
output are filled in before unpatchifying. The refiner layers keep their stock processors (they run
every token, before the step). ZImagePipeline batches classifier-free guidance as [conditional,
unconditional] rows of one call (`guidance_scale > 0`). Refused: omni mode (SigLIP image conditioning),
ControlNet, samples of different sizes in one batch, and `cfg_truncation` below 1 (the batch would
halve inside a generation).
"""

from __future__ import annotations

import threading

import torch
from diffusers import ZImageTransformer2DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn

from specdiff.adapters.base import Adapter, TokenCachingProcessor
from specdiff.engine.attention import joint_kv, tap_attention
from specdiff.engine.tokens import gather_tokens

SEQUENCE_MULTIPLE = 32  # the stock forward pads each sample's image tokens to a multiple of this


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, D) rotated by complex frequencies (B, S, D / 2), as ZSingleStreamAttnProcessor."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs.unsqueeze(2)).flatten(3).type_as(x)


def gather_image_rows(sequence: torch.Tensor, image_tokens: int, active: torch.Tensor) -> torch.Tensor:
    """Rows [active image tokens, everything after the image tokens] of a (B, S, ...) sequence."""
    return torch.cat([gather_tokens(sequence[:, :image_tokens], active), sequence[:, image_tokens:]], dim=1)


class ZImageTokenCachingProcessor(TokenCachingProcessor):
    """ZSingleStreamAttnProcessor's math over [image, caption], with the image keys / values of every
    image token from the engine's cache and the batch-padding key mask as given."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        ctx = self.context
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k, v = (t.unflatten(-1, (attn.heads, -1)) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        text_len = ctx.text_length  # the caption and the batch padding after the image tokens
        if freqs_cis is not None:
            if ctx.enabled and ctx.active is not None:  # every token's rows come in: those of the tokens that run
                freqs_cis = gather_image_rows(freqs_cis, freqs_cis.shape[1] - text_len, ctx.active)
            q, k = rotate(q, freqs_cis), rotate(k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D)
        image_len = q.shape[2] - text_len
        if ctx.enabled and ctx.kv_branch >= 0:
            k, v = joint_kv(ctx, self.kv_slots, k[:, :, :image_len], v[:, :, :image_len], k[:, :, image_len:],
                            v[:, :, image_len:], text_first=False)
        if ctx.enabled:
            tap_attention(ctx, self.tap_offset, q[:, :, :image_len], q[:, :, image_len:], k,
                          slice(0, k.shape[2] - text_len))
        if attention_mask is not None and attention_mask.ndim == 2:  # over the keys: every token's
            attention_mask = attention_mask[:, None, None, :]
        out = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attention_mask,
                                    dropout_p=0.0, is_causal=False, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        out = attn.to_out[0](out.flatten(2, 3).to(q.dtype))
        return attn.to_out[1](out) if len(attn.to_out) > 1 else out


class ZImageAdapter(Adapter):
    """Z-Image: image tokens refined, joined with the caption, single-stream main layers."""

    model_types = (ZImageTransformer2DModel,)
    head_module = "all_final_layer"  # a ModuleDict: every final layer is hooked
    block_lists = ("layers",)
    # a main layer takes and returns [image, caption] joined (`x`): call_block splits its output
    timestep_argument = "t"
    conditional_rows_first = True
    refused_arguments = {"controlnet_block_samples": "ControlNet", "siglip_feats": "SigLIP image conditioning"}
    graphs_refused = ("its forward takes lists of per-sample tensors and builds the joined sequence on the host "
                      "each call, which a CUDA graph cannot replay")

    def __init__(self, model, runtime) -> None:
        super().__init__(model, runtime)
        self._call = threading.local()  # this call's sizes (image tokens, batch, padded caption), read by its hooks

    @staticmethod
    def cfg_groups(arguments: dict) -> int:
        return 2 if (arguments.get("guidance_scale") or 0.0) > 0 else 1  # [cond, uncond] rows of one call

    def refuse_pipeline_call(self, arguments: dict) -> str | None:
        truncation = arguments.get("cfg_truncation")
        if truncation is not None and truncation < 1.0 and (arguments.get("guidance_scale") or 0.0) > 0:
            return f"cfg_truncation={truncation} (guidance stops mid-generation and the batch halves)"
        return super().refuse_pipeline_call(arguments)

    def refuse_call(self, arguments: dict) -> str | None:
        latents = arguments["x"]
        if latents and isinstance(latents[0], list):
            return "omni mode (image conditioning)"
        if len({tuple(x.shape) for x in latents}) > 1:
            return "samples of different sizes in one batch"
        return None

    def without_cfg(self, arguments: dict) -> dict:
        return {"guidance_scale": 0.0} if (arguments.get("guidance_scale") or 0.0) > 0 else {}

    def to_schedule(self, value: float) -> float:
        return 1000.0 - 1000.0 * value  # ZImagePipeline passes (1000 - t) / 1000

    def text_length(self, arguments: dict) -> int:
        return 0  # known once the sequence is joined (set before the first main layer)

    def image_tokens(self, arguments: dict) -> int:
        patch, frame_patch = arguments.get("patch_size", 2), arguments.get("f_patch_size", 1)
        channels, frames, height, width = arguments["x"][0].shape
        tokens = (frames // frame_patch) * (height // patch) * (width // patch)
        return tokens + (-tokens) % SEQUENCE_MULTIPLE

    def make_processor(self, kv_slots, layer_index: int):
        return ZImageTokenCachingProcessor(self.runtime.context, kv_slots, layer_index)

    def processor_for(self, name: str, original, kv_slots, layer_index: int):
        if not name.startswith("layers."):  # the refiners run every token before the step: stock
            return original
        return self.make_processor(kv_slots, layer_index)

    def block_streams(self, block, arguments):
        """A main layer takes [image, caption] joined (`x`): block-level methods see the image rows as the
        tokens and the caption rows as the text, and the model gets them joined back."""
        joined = arguments.pop("x")
        image_len = joined.shape[1] - self.runtime.context.text_length
        return joined[:, :image_len], joined[:, image_len:], arguments, lambda c, x: torch.cat([x, c], dim=1)

    def call_block(self, forward, tokens, text, arguments: dict):
        out = forward(x=torch.cat([tokens, text], dim=1), **arguments)
        return out[:, tokens.shape[1]:], out[:, :tokens.shape[1]]  # (text, image), as block-level methods read

    def block_arguments(self, arguments: dict, active: torch.Tensor) -> dict:
        """A subset of the image tokens through a layer (ToCa): its key-mask entries (the processor picks
        the RoPE rows itself)."""
        changed = dict(arguments)
        image_tokens = self._call.image_tokens
        if arguments.get("attn_mask") is not None:
            mask = arguments["attn_mask"].unsqueeze(-1)
            changed["attn_mask"] = gather_image_rows(mask, image_tokens, active).squeeze(-1)
        return changed

    # -- hooks: plan before the first main layer, fill at the final layer ---------------------------
    def step_hooks(self, model) -> list:
        handles = [model.register_forward_pre_hook(self._remember_call, with_kwargs=True),
                   model.cap_embedder.register_forward_hook(self._plan_step),
                   model.layers[0].register_forward_pre_hook(self._gather_tokens, with_kwargs=True)]
        handles += [layer.register_forward_hook(self._fill_step) for layer in model.all_final_layer.values()]
        return handles

    def _remember_call(self, module, args, kwargs):
        arguments = self._signature.bind(module, *args, **kwargs).arguments
        self._call.image_tokens = self.image_tokens(arguments)
        self._call.batch = len(arguments["x"])
        captions = [len(c) + (-len(c)) % SEQUENCE_MULTIPLE for c in arguments["cap_feats"]]
        # the joined sequence: image tokens, then the longest padded caption (shorter ones: batch padding)
        self._call.text_length = max(captions)
        return None

    def _plan_step(self, module, args, embedded):
        context = self.runtime.context
        context.text_length = self._call.text_length
        self.runtime.begin_step(context.timestep, self._call.batch, self._call.image_tokens, embedded.device)
        return None

    def _gather_tokens(self, module, args, kwargs):
        context = self.runtime.context
        if not context.enabled or context.active is None:
            return None
        image_tokens = self._call.image_tokens
        if args:
            return (gather_image_rows(args[0], image_tokens, context.active), *args[1:]), kwargs
        return args, {**kwargs, "x": gather_image_rows(kwargs["x"], image_tokens, context.active)}

    def _fill_step(self, module, args, output):
        context = self.runtime.context
        if not context.enabled:
            return output
        image_len = output.shape[1] - context.text_length
        filled = self.runtime.end_step(output[:, :image_len])
        return torch.cat([filled, output[:, image_len:]], dim=1)
