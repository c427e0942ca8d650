"""Stock SD3 / FLUX.1 / FLUX.2 [klein] / Qwen-Image / Wan / Z-Image pipelines with tiny random weights, built offline.

For tests and engine benchmarks: the pipeline code is diffusers' own; only
the components are small. Tokenizers are built in memory from a character
vocabulary, so nothing is downloaded.
"""

from __future__ import annotations

import string

import torch

_CHARS = list(string.ascii_lowercase) + list(string.digits) + list(".,!?'")


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + c, -1.0) for c in _CHARS] + [(c, -2.0) for c in _CHARS]
    return T5Tokenizer(vocab=pieces)


def _clip_text_encoder(hidden: int, projection: int, vocab: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, projection_dim=projection, max_position_embeddings=77,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config)


def _t5_encoder(d_model: int, vocab: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab, d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=1, num_heads=2)
    return T5EncoderModel(config)


def _vae(latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(16, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=64, **extra,
    )


def _eval(pipe):
    """Modules built from configs start in training mode (dropout on): switch it off."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def tiny_sd3_pipeline(width: int = 64, layers: int = 2, heads: int = 2, seed: int = 0, dual_attention: bool = False):
    """A StableDiffusion3Pipeline with random weights; VAE downsamples by 2, patch 2."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tokenizer = _clip_tokenizer()
    vocab = len(tokenizer)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
        attention_head_dim=width // heads, num_attention_heads=heads, joint_attention_dim=64,
        caption_projection_dim=width, pooled_projection_dim=64, pos_embed_max_size=64,
        dual_attention_layers=(0,) if dual_attention else (), qk_norm="rms_norm" if dual_attention else None,
    )
    return _eval(StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(4, shift_factor=0.0, scaling_factor=1.0),
        text_encoder=_clip_text_encoder(32, 32, vocab), tokenizer=tokenizer,
        text_encoder_2=_clip_text_encoder(32, 32, vocab), tokenizer_2=_clip_tokenizer(),
        text_encoder_3=_t5_encoder(64, len(_t5_tokenizer())), tokenizer_3=_t5_tokenizer(),
    ))


def tiny_flux_pipeline(width: int = 64, double_layers: int = 1, single_layers: int = 2, heads: int = 2, seed: int = 0):
    """A FluxPipeline with random weights and embedded guidance (like FLUX.1-dev)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    head_dim = width // heads
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=None, num_layers=double_layers,
        num_single_layers=single_layers, attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(head_dim - 2 * (head_dim // 8 * 3), head_dim // 8 * 3, head_dim // 8 * 3),
    )
    clip = _clip_text_encoder(32, 32, len(_clip_tokenizer()))
    from transformers import CLIPTextModel

    clip_plain = CLIPTextModel(clip.config)
    return _eval(FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        ),
        vae=_vae(4, shift_factor=0.0, scaling_factor=1.0),
        text_encoder=clip_plain, tokenizer=_clip_tokenizer(),
        text_encoder_2=_t5_encoder(64, len(_t5_tokenizer())), tokenizer_2=_t5_tokenizer(),
    ))


def _qwen_tokenizer():
    """A byte-level tokenizer with Qwen's chat tokens and no merges (one token per byte), in memory."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2TokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return Qwen2TokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                              additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def _qwen_text_encoder(vocab: int, hidden: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048, bos_token_id=vocab - 3,
                eos_token_id=vocab - 3, pad_token_id=vocab - 3,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden, patch_size=2,
                  spatial_merge_size=1, temporal_patch_size=1)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, vocab_size=vocab,
                                                               hidden_size=hidden, bos_token_id=vocab - 3,
                                                               eos_token_id=vocab - 3))


def tiny_qwenimage_pipeline(width: int = 32, layers: int = 2, heads: int = 2, seed: int = 0):
    """A QwenImagePipeline with random weights: a one-layer Qwen2.5-VL text encoder with a byte tokenizer, a
    small Qwen-Image VAE (downsamples by 4), latents packed 2 x 2. Classifier-free guidance is
    `true_cfg_scale` with a `negative_prompt` (a second transformer call per step)."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

    torch.manual_seed(seed)
    head_dim = width // heads
    rope = (head_dim - 2 * (head_dim // 8 * 3), head_dim // 8 * 3, head_dim // 8 * 3)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=16, axes_dims_rope=rope)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    tokenizer = _qwen_tokenizer()
    return _eval(QwenImagePipeline(
        scheduler=_dynamic_shift_scheduler(), vae=vae, text_encoder=_qwen_text_encoder(len(tokenizer), 16), tokenizer=tokenizer, transformer=transformer))


def tiny_wan_pipeline(width: int = 24, layers: int = 2, heads: int = 2, seed: int = 0, two_stage: bool = False):
    """A WanPipeline (text-to-video) with random weights: a one-layer UMT5 text encoder, a small Wan VAE,
    patches of 1 x 2 x 2. Classifier-free guidance is a second transformer call per step. two_stage: as
    Wan 2.2 A14B, a second transformer (`transformer_2`, other random weights) runs the steps whose
    timestep is below half of the schedule (`boundary_ratio=0.5`)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = _t5_tokenizer()
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=width // heads,
                                        in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=2 * width,
                                        num_layers=layers, rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                               num_heads=2))
    second = None
    if two_stage:
        second = WanTransformer3DModel.from_config(transformer.config)
    return _eval(WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer_2=second,
                             boundary_ratio=0.5 if two_stage else None))


_CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _qwen3_text_stack(layers: int):
    """(tokenizer with a chat template, Qwen3 text encoder of `layers` layers), both tiny, in memory."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = _qwen_tokenizer()
    tokenizer.chat_template = _CHAT_TEMPLATE
    vocab = len(tokenizer)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=2048, bos_token_id=vocab - 3,
        eos_token_id=vocab - 3, pad_token_id=vocab - 3))
    return tokenizer, text_encoder


def _dynamic_shift_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def tiny_flux2_klein_pipeline(width: int = 32, double_layers: int = 1, single_layers: int = 2, heads: int = 2,
                              seed: int = 0):
    """A Flux2KleinPipeline (FLUX.2 [klein]) with random weights: a one-layer Qwen3 text encoder with a byte
    tokenizer and a chat template, a small FLUX.2 VAE, latents packed 2 x 2. Classifier-free guidance is a
    second transformer call per step (`cache_context("uncond")`). Call it with text_encoder_out_layers=(1, 1, 1)
    (the text encoder has one layer) and a short max_sequence_length."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel

    torch.manual_seed(seed)
    head_dim = width // heads
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=double_layers, num_single_layers=single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=3 * 16,
        timestep_guidance_channels=16, axes_dims_rope=(head_dim // 4,) * 4, guidance_embeds=False)
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16),
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             layers_per_block=1, norm_num_groups=8, sample_size=64)
    tokenizer, text_encoder = _qwen3_text_stack(layers=1)
    return _eval(Flux2KleinPipeline(scheduler=_dynamic_shift_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                    transformer=transformer, is_distilled=False))


def tiny_zimage_pipeline(width: int = 32, layers: int = 2, heads: int = 2, seed: int = 0):
    """A ZImagePipeline with random weights: a two-layer Qwen3 text encoder (the pipeline reads its
    second-to-last hidden states) with a byte tokenizer and a chat template, a small VAE, patches of 2 x 2,
    one refiner layer per stream. Classifier-free guidance: [conditional, unconditional] rows of one call."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    head_dim = width // heads
    axes = (head_dim - 2 * (head_dim // 8 * 3), head_dim // 8 * 3, head_dim // 8 * 3)
    transformer = ZImageTransformer2DModel(in_channels=4, dim=width, n_layers=layers, n_refiner_layers=1,
                                           n_heads=heads, n_kv_heads=heads, cap_feat_dim=16, axes_dims=list(axes),
                                           axes_lens=[64, 32, 32])
    tokenizer, text_encoder = _qwen3_text_stack(layers=2)
    return _eval(ZImagePipeline(scheduler=_dynamic_shift_scheduler(), vae=_vae(4, shift_factor=0.0), text_encoder=text_encoder,
                                tokenizer=tokenizer, transformer=transformer))


def save_tiny_clip(folder) -> None:
    """A tiny random CLIPModel + CLIPProcessor saved to `folder` (for testing the CLIP score offline)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = _clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
