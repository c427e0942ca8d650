"""The embedded model's denoiser: a small diffusers SD3Transformer2DModel in pixel space."""

from __future__ import annotations

from diffusers import SD3Transformer2DModel

from specdiff.reference.scenes import IMAGE_SIZE

TRANSFORMER_CONFIG = dict(
    sample_size=IMAGE_SIZE,
    patch_size=2,  # 16 x 16 = 256 image tokens at 32 px
    in_channels=3,
    out_channels=3,
    num_layers=4,
    attention_head_dim=64,
    num_attention_heads=3,  # width 192
    joint_attention_dim=384,  # MiniLM width
    caption_projection_dim=192,
    pooled_projection_dim=384,
    pos_embed_max_size=32,  # sizes up to 64 px, any aspect ratio
)


def build_transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(**TRANSFORMER_CONFIG)
