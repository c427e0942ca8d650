"""The embedded model's pipeline, in the diffusers style:
prompt -> MiniLM text encoder -> SD3Transformer2DModel -> flow-matching Euler -> image.

Rows are batched [unconditional, conditional] under CFG, as in
StableDiffusion3Pipeline, so specdiff and other libraries' caches treat it
exactly as they treat SD3.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from specdiff.reference.scenes import IMAGE_SIZE

WEIGHTS_DIR = Path(__file__).parent / "weights"
CHECKSUMS = "SHA256SUMS"
DEFAULT_GUIDANCE = 4.0
DEFAULT_STEPS = 28


class CorruptModelError(RuntimeError):
    """A model file is missing or does not match its recorded hash."""


class ScenePipeline(DiffusionPipeline):
    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: SD3Transformer2DModel, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        self._text_encoder = None

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            from specdiff.reference.text_encoder import shared_text_encoder

            self._text_encoder = shared_text_encoder()
        return self._text_encoder

    def encode_prompt(self, prompts: list[str], negative_prompts: list[str] | None):
        """(tokens, pooled) for the prompts; with CFG the negative rows come first."""
        encoder = self.text_encoder
        tokens, pooled = encoder(prompts)
        if negative_prompts is not None:
            neg_tokens, neg_pooled = encoder(negative_prompts)
            tokens, pooled = torch.cat([neg_tokens, tokens]), torch.cat([neg_pooled, pooled])
        dtype, device = self.transformer.dtype, self.transformer.device
        return tokens.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] = "",
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        height: int = IMAGE_SIZE,
        width: int = IMAGE_SIZE,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
    ):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        patch = self.transformer.config.patch_size
        if height % patch or width % patch or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {patch}, got {height} x {width}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        batch = len(prompts)
        use_cfg = guidance_scale > 1.0
        negatives = None
        if use_cfg:
            negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
            negatives = [n for n in negatives for _ in range(num_images_per_prompt)] if len(negatives) != batch else negatives
        tokens, pooled = self.encode_prompt(prompts, negatives)
        device, dtype = self.transformer.device, self.transformer.dtype
        shape = (batch, self.transformer.config.in_channels, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = torch.cat([latents, latents]) if use_cfg else latents
            timestep = t.expand(model_input.shape[0])
            velocity = self.transformer(model_input.to(dtype), tokens, pooled, timestep).sample.float()
            if use_cfg:
                uncond, cond = velocity.chunk(2)
                velocity = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(velocity, t, latents).prev_sample
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, {"latents": latents})
        if output_type == "latent":
            images = latents
        else:
            images = (latents / 2 + 0.5).clamp(0, 1)
            if output_type in ("np", "pil"):
                images = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                images = [Image.fromarray((img * 255).round().astype(np.uint8)) for img in images]
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_model_folder(folder: Path) -> None:
    """Check every file listed in SHA256SUMS; raise CorruptModelError naming the bad file."""
    sums = folder / CHECKSUMS
    if not sums.exists():
        raise CorruptModelError(f"{sums} is missing: cannot verify the model files")
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        expected, name = line.split(maxsplit=1)
        path = folder / name.strip()
        if not path.exists():
            raise CorruptModelError(f"model file {path} is missing")
        if file_sha256(path) != expected:
            raise CorruptModelError(f"model file {path} does not match its recorded SHA-256: it is corrupt or was changed")


def write_checksums(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS and p.suffix != ".md")
    lines = [f"{file_sha256(p)}  {p.relative_to(folder).as_posix()}" for p in files]
    (folder / CHECKSUMS).write_text("\n".join(lines) + "\n")


def load_scene_pipeline(folder: str | Path | None = None, dtype: torch.dtype = torch.float32, verify: bool = True) -> ScenePipeline:
    """Load the embedded model (default: the one shipped in the package), offline, from safetensors only."""
    folder = Path(folder) if folder is not None else WEIGHTS_DIR
    if verify:
        verify_model_folder(folder)
    transformer = SD3Transformer2DModel.from_pretrained(
        folder / "transformer", use_safetensors=True, local_files_only=True, torch_dtype=dtype
    )
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
    pipe = ScenePipeline(transformer=transformer.eval(), scheduler=scheduler)
    return pipe


def export_pipeline(transformer: SD3Transformer2DModel, folder: Path, shift: float = 3.0) -> None:
    """Write a diffusers folder: fp16 safetensors weights, scheduler config, checksums."""
    folder.mkdir(parents=True, exist_ok=True)
    transformer.to(torch.float16).save_pretrained(folder / "transformer", safe_serialization=True)
    transformer.to(torch.float32)
    FlowMatchEulerDiscreteScheduler(shift=shift).save_pretrained(folder / "scheduler")
    write_checksums(folder)
