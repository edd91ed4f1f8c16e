"""The reference scores: a direct, unbatched-by-us forward pass of the same model."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


@lru_cache(maxsize=4)
def _load(model_dir: str):
    return AutoTokenizer.from_pretrained(model_dir), AutoModelForSequenceClassification.from_pretrained(model_dir).eval()


@torch.no_grad()
def reference_logits(model_dir: Path, query: str, passages: list[str], max_length: int = 512) -> list[float]:
    """Logits from the tokenizer's own pair encoding (only the passage truncated) and one forward pass each."""
    tokenizer, model = _load(str(model_dir))
    logits = []
    for passage in passages:
        encoded = tokenizer(query, passage, truncation="only_second", max_length=max_length, return_tensors="pt")
        logits.append(model(**encoded).logits[0, 0].float().item())
    return logits


def sigmoid(values: list[float]) -> list[float]:
    """Sigmoid in fp32, as the worker computes it."""
    return torch.sigmoid(torch.tensor(values, dtype=torch.float32)).tolist()
