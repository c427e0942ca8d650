"""CLIP score (prompt alignment on real models) from a CLIP model the user already has.

CLIP score = 100 * max(cos(image embedding, text embedding), 0), the usual
definition (Hessel et al., 2021). Its image embeddings also give a Fréchet
distance between two image sets (FID's formula in CLIP's feature space).
The model is loaded with transformers from a local folder or the user's own
hub cache, never downloaded.
"""

from __future__ import annotations

import numpy as np
import torch

from specdiff.lab.evaluation.metrics import QualityModelMissing


class ClipScorer:
    def __init__(self, name_or_path: str, device: str | torch.device = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        import pickle

        try:  # safetensors only, as for the models: a pickle (.bin) could run code when loaded
            self.model = CLIPModel.from_pretrained(name_or_path, local_files_only=True,
                                                   use_safetensors=True).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(name_or_path, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError, pickle.UnpicklingError) as error:
            raise QualityModelMissing(
                f"--clip-model {name_or_path!r}: no CLIP model in safetensors (weights, tokenizer and preprocessor "
                f"config) found there or in the local hub cache; specdiff never downloads and never reads pickle "
                f"(.bin) weights. Save one with CLIPModel/CLIPProcessor.save_pretrained(folder) and pass the "
                f"folder. ({error.__class__.__name__})"
            ) from None
        self.device = device

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        arrays = [(img.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8) for img in images]
        return self.processor(images=arrays, return_tensors="pt")["pixel_values"].to(self.device)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        """(B, d) CLIP image embeddings of images (B, 3, H, W) in [0, 1]."""
        return _embedding(self.model.get_image_features(pixel_values=self._pixels(images))).float().cpu().numpy()

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> np.ndarray:
        """(B,) CLIP scores of images (B, 3, H, W) in [0, 1] against their prompts."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        inputs = self.processor(text=prompts, return_tensors="pt", padding=True, truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        image = _embedding(self.model.get_image_features(pixel_values=self._pixels(images)))
        text = _embedding(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                       attention_mask=inputs["attention_mask"]))
        cosine = torch.nn.functional.cosine_similarity(image, text, dim=-1)
        return (100 * cosine.clamp_min(0)).float().cpu().numpy()


def _embedding(output) -> torch.Tensor:
    """transformers 5 may return a model output rather than a tensor: take its pooled embedding."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output
