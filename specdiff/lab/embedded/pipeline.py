"""The embedded model's pipeline, in the diffusers style:
prompt -> MiniLM text encoder -> SD3Transformer2DModel -> flow-matching Euler -> image.

Rows are batched [unconditional, conditional] under CFG, as in
StableDiffusion3Pipeline, so specdiff and other libraries' caches treat it
exactly as they treat SD3.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from specdiff.lab.embedded.scenes import V1, SceneStyle, get_style

WEIGHTS_DIR = Path(__file__).parent / "weights"
WEIGHTS_V2_DIR = Path(__file__).parent / "weights_v2"
CHECKSUMS = "SHA256SUMS"
STYLE_FILE = "scene_style.json"  # which scene data the weights learned (absent: v1)
DEFAULT_GUIDANCE = 4.0
DEFAULT_STEPS = 28


class CorruptModelError(RuntimeError):
    """A model file is missing or does not match its recorded hash."""


class ScenePipeline(DiffusionPipeline):
    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: SD3Transformer2DModel, scheduler: FlowMatchEulerDiscreteScheduler,
                 style: str = V1.name):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        self.register_to_config(style=style)
        self._text_encoder = None

    @property
    def style(self) -> SceneStyle:
        return get_style(self.config.style)

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            from specdiff.lab.embedded.text_encoder import shared_text_encoder

            self._text_encoder = shared_text_encoder(self.style.max_tokens)
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
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
    ):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        height = self.style.image_size if height is None else height
        width = self.style.image_size if width is None else width
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


def _checked_file(folder: Path, name: str) -> Path:
    """A listed file: inside the folder, a regular file, not a link (read before it is opened)."""
    path = folder / name
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise CorruptModelError(f"{folder / CHECKSUMS} lists {name!r}, which is outside the model folder")
    if path.is_symlink():
        raise CorruptModelError(f"model file {path} is a symbolic link; only regular files are read")
    if not path.exists():
        raise CorruptModelError(f"model file {path} is missing")
    if not path.is_file():
        raise CorruptModelError(f"model file {path} is not a regular file")
    return path


def verify_model_folder(folder: Path, required: tuple[str, ...] = ()) -> None:
    """Check every file listed in SHA256SUMS, and that every file the loader reads is listed:
    each model file under transformer/ and scheduler/, the scene style file, and `required`.
    Raises CorruptModelError naming the bad file."""
    sums = folder / CHECKSUMS
    if not sums.is_file() or sums.is_symlink():
        raise CorruptModelError(f"{sums} is missing (or not a regular file): cannot verify the model files")
    listed: dict[str, str] = {}
    for number, line in enumerate(sums.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64 or any(c not in "0123456789abcdef" for c in parts[0].lower()):
            raise CorruptModelError(f"{sums} line {number} is not '<sha256>  <file>': {line[:80]!r}")
        listed[parts[1].strip().lstrip("*")] = parts[0].lower()
    read = {p.relative_to(folder).as_posix() for sub in ("transformer", "scheduler") if (folder / sub).is_dir()
            for p in (folder / sub).rglob("*") if p.is_file() or p.is_symlink()}
    read |= {name for name in (STYLE_FILE, *required) if (folder / name).exists() or (folder / name).is_symlink()}
    for name in sorted(read - set(listed)):
        raise CorruptModelError(f"model file {folder / name} has no line in {sums}: it cannot be verified")
    for name, expected in listed.items():
        path = _checked_file(folder, name)
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
    # Checksums prove the files are the listed ones, not that they are a scene model: check what each
    # file must hold before diffusers reads it, and name the file when it cannot be read.
    config = _json_object(folder / "transformer" / "config.json")
    if config.get("_class_name") != "SD3Transformer2DModel":
        raise CorruptModelError(f"{folder / 'transformer' / 'config.json'} describes {config.get('_class_name')!r}; "
                                "a scene model's transformer is an SD3Transformer2DModel")
    scheduler_config = _json_object(folder / "scheduler" / "scheduler_config.json")
    shift = scheduler_config.get("shift", 1.0)
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not 0 < shift < float("inf"):
        raise CorruptModelError(f"{folder / 'scheduler' / 'scheduler_config.json'}: shift must be a positive number, "
                                f"got {shift!r}")
    style = V1.name
    if (folder / STYLE_FILE).exists():
        style = _json_object(folder / STYLE_FILE).get("style")
        try:
            style = get_style(style).name
        except ValueError as error:
            raise CorruptModelError(f"{folder / STYLE_FILE}: {error}") from None
    try:
        transformer = SD3Transformer2DModel.from_pretrained(
            folder / "transformer", use_safetensors=True, local_files_only=True, torch_dtype=dtype
        )
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise CorruptModelError(f"the scene model at {folder} cannot be loaded: {first_line}") from None
    return ScenePipeline(transformer=transformer.eval(), scheduler=scheduler, style=style)


def _json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise CorruptModelError(f"{path} is not a readable JSON file ({str(error)[:120]})") from None
    if not isinstance(value, dict):
        raise CorruptModelError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def export_pipeline(transformer: SD3Transformer2DModel, folder: Path, shift: float = 3.0,
                    style: SceneStyle = V1) -> None:
    """Write a diffusers folder: fp16 safetensors weights in files of at most 16 MB, scheduler config,
    the scene style, checksums."""
    folder.mkdir(parents=True, exist_ok=True)
    transformer.to(torch.float16).save_pretrained(folder / "transformer", safe_serialization=True,
                                                  max_shard_size="16MB")
    transformer.to(torch.float32)
    FlowMatchEulerDiscreteScheduler(shift=shift).save_pretrained(folder / "scheduler")
    if style is not V1:
        (folder / STYLE_FILE).write_text(json.dumps({"style": style.name}) + "\n")
    write_checksums(folder)
