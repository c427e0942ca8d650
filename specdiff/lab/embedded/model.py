"""The embedded model's denoiser: a small diffusers SD3Transformer2DModel in pixel space."""

from __future__ import annotations

from diffusers import SD3Transformer2DModel

from specdiff.lab.embedded.scenes import V1, V2, SceneStyle

_V1_CONFIG = dict(
    sample_size=V1.image_size,
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
# V2: 64 px with patch 4 keeps 256 image tokens on the same 16 x 16 grid (patch 2 would be 1,024 tokens at
# 6x the seconds per training step: see the model card), and V1's width, so V2 can start from V1's weights.
_V2_CONFIG = dict(_V1_CONFIG, sample_size=V2.image_size, patch_size=4)
TRANSFORMER_CONFIGS = {"v1": _V1_CONFIG, "v2": _V2_CONFIG}
TRANSFORMER_CONFIG = _V1_CONFIG


def transformer_config(style: SceneStyle = V1, **overrides) -> dict:
    config = dict(TRANSFORMER_CONFIGS[style.name], **overrides)
    config["caption_projection_dim"] = config["num_attention_heads"] * config["attention_head_dim"]
    return config


def build_transformer(style: SceneStyle = V1, **overrides) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(**transformer_config(style, **overrides))
