"""What users would run instead: the seed's algorithm and sentence-transformers' CrossEncoder."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


class SeedReranker:
    """The seed's `BGERerankerDetailed`: batches of 32 in input order, pad to longest, `no_grad`, fp32."""

    batch_size = 32

    def __init__(self, path: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
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
            with torch.no_grad():
                logits = self.model(**encoded).logits.squeeze(-1)
            scores.extend(torch.sigmoid(logits).tolist())
        return scores


class SentenceTransformersReranker:
    """sentence-transformers `CrossEncoder.rank`, its defaults (batch 32, sigmoid for one label)."""

    def __init__(self, path: Path) -> None:
        from sentence_transformers import CrossEncoder

        self.model = CrossEncoder(str(path), device="cpu", max_length=512)

    def scores(self, query: str, documents: list[str]) -> list[float]:
        """Sigmoid scores in input order (from `rank`, which sorts)."""
        ranked = self.model.rank(query, documents, show_progress_bar=False)
        scores = [0.0] * len(documents)
        for item in ranked:
            scores[item["corpus_id"]] = float(item["score"])
        return scores
