"""What users would run instead: the seed's algorithm and sentence-transformers' CrossEncoder."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


class SeedReranker:
    """The seed's `BGERerankerDetailed`: batches in input order (32 on CPU, 128 on CUDA), pad to longest,
    `no_grad`, fp32 on CPU and fp16 on CUDA, `empty_cache` after each GPU batch."""

    def __init__(self, path: Path, device: str = "cpu", dtype: str | None = None) -> None:
        """Load as the seed does; `dtype="fp32"` on CUDA gives the full-precision reference scores."""
        self.device = device
        self.cuda = device.startswith("cuda")
        self.batch_size = 128 if self.cuda else 32
        self.dtype_name = dtype or ("fp16" if self.cuda else "fp32")
        dtype = {"fp16": torch.float16, "fp32": torch.float32}[self.dtype_name]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).to(device).eval()
        self.padded_tokens = 0

    def scores(self, query: str, documents: list[str]) -> list[float]:
        """Sigmoid scores in input order, computed exactly as the seed does."""
        self.padded_tokens = 0
        scores: list[float] = []
        for start in range(0, len(documents), self.batch_size):
            batch = documents[start : start + self.batch_size]
            encoded = self.tokenizer(
                [[query, doc] for doc in batch], padding=True, truncation=True, max_length=512, return_tensors="pt"
            )
            self.padded_tokens += encoded["input_ids"].numel()
            encoded = {k: v.to(self.device) for k, v in encoded.items()}
            with torch.no_grad():
                logits = self.model(**encoded).logits.squeeze(-1)
            scores.extend(torch.sigmoid(logits).cpu().tolist())
            if self.cuda:
                torch.cuda.empty_cache()
        return scores


class SentenceTransformersReranker:
    """sentence-transformers `CrossEncoder.rank`, its defaults (batch 32, sigmoid for one label)."""

    def __init__(self, path: Path, device: str = "cpu") -> None:
        from sentence_transformers import CrossEncoder

        self.model = CrossEncoder(str(path), device=device, max_length=512)

    def scores(self, query: str, documents: list[str]) -> list[float]:
        """Sigmoid scores in input order (from `rank`, which sorts)."""
        ranked = self.model.rank(query, documents, show_progress_bar=False)
        scores = [0.0] * len(documents)
        for item in ranked:
            scores[item["corpus_id"]] = float(item["score"])
        return scores
