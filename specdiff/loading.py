"""Loading a pipeline for the command line and the benchmark: the embedded model, or a local
diffusers SD3 / SD3.5 / FLUX folder, offline and from safetensors only."""

from __future__ import annotations

import json
from pathlib import Path


class ModelLoadError(ValueError):
    """A model folder that cannot be used: missing, not a supported pipeline, corrupt, or not loadable offline."""


def load_pipeline(model: str | None, device: str, dtype_name: str):
    """The embedded model (model=None), or a local diffusers SD3 / SD3.5 / FLUX folder."""
    import torch

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype_name]
    if model is None:
        from specdiff.reference.pipeline import CorruptModelError, load_scene_pipeline

        try:
            return load_scene_pipeline(dtype=dtype).to(device), "embedded scene model"
        except CorruptModelError as error:
            raise ModelLoadError(str(error)) from None
    if model == "embedded-v2":  # the next embedded model, while it trains (its model card says how far)
        from specdiff.reference.pipeline import WEIGHTS_V2_DIR

        model = str(WEIGHTS_V2_DIR)
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"--model {model}: no such folder (give a local diffusers pipeline folder)")
    index = folder / "model_index.json"
    if index.exists() and not index.is_file():
        raise ModelLoadError(f"--model {model}: model_index.json is not a regular file")
    if not index.exists():
        if (folder / "transformer").is_dir() and (folder / "SHA256SUMS").exists():
            from specdiff.reference.pipeline import CorruptModelError, load_scene_pipeline

            try:
                return load_scene_pipeline(folder, dtype=dtype).to(device), f"scene model at {folder}"
            except CorruptModelError as error:
                raise ModelLoadError(str(error)) from None
        raise ModelLoadError(f"--model {model}: no model_index.json, so this is not a diffusers pipeline folder")
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    except (ValueError, AttributeError, OSError) as error:
        raise ModelLoadError(f"--model {model}: model_index.json is not a readable JSON object ({error})") from None
    supported = ("StableDiffusion3Pipeline", "FluxPipeline")
    if class_name not in supported:
        raise ModelLoadError(f"--model {model}: {class_name or 'unknown'} pipeline is not supported; supported: {', '.join(supported)}")
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # its own error lines would precede ours
    try:  # safetensors only: pickle weights (.bin) could run code when loaded
        pipe = getattr(diffusers, class_name).from_pretrained(folder, local_files_only=True, torch_dtype=dtype,
                                                              use_safetensors=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"--model {model}: could not load it offline from safetensors files: {first_line}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return pipe.to(device), f"{class_name} at {folder}"
