"""Stable task and queue names shared by producers and workers."""

TASK_DOCUMENTS = "rerank.documents"
"""Stage 1: score candidate papers by title and abstract."""

TASK_CHUNKS = "rerank.chunks"
"""Stage 2: score chunks, optionally only those of the papers stage 1 kept."""

DEFAULT_QUEUE = "rerank"
"""Queue both tasks go to unless settings route them elsewhere."""
