"""The Celery client of the re-ranking contract (`contract`), and the contract's public names; no torch."""

from contract.errors import (
    BrokerUnavailable,
    InvalidRequest,
    JobCancelled,
    ModelLoadError,
    RerankError,
    RerankTimeout,
    TaskTimedOut,
    WorkerError,
)
from contract.names import DEFAULT_QUEUE, TASK_CHUNKS, TASK_DOCUMENTS, TASK_PASSAGES
from contract.schemas import (
    Candidate,
    Chunk,
    ChunksRequest,
    DocumentsRequest,
    PaperChunk,
    PassagesRequest,
    RankedItem,
    RerankResult,
    ScoringInfo,
    TwoStageResult,
)
from contract.settings import Settings

# The clients load Celery, kombu and redis: they are imported when first named (PEP 562), so that
# `rerank --help`, or a usage error, answers without loading them.
_LAZY = {
    "AsyncRerankClient": "producer.aio",
    "RerankClient": "producer.client",
    "BatchProgress": "producer.jobs",
    "JobProgress": "producer.jobs",
    "RerankBatch": "producer.jobs",
    "RerankJob": "producer.jobs",
}


def __getattr__(name: str) -> object:
    """Import a client or job name from its module on first use."""
    if name not in _LAZY:
        raise AttributeError(f"module 'producer' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value

__all__ = [
    "AsyncRerankClient",
    "BatchProgress",
    "BrokerUnavailable",
    "Candidate",
    "Chunk",
    "ChunksRequest",
    "DEFAULT_QUEUE",
    "DocumentsRequest",
    "InvalidRequest",
    "JobCancelled",
    "JobProgress",
    "ModelLoadError",
    "PaperChunk",
    "PassagesRequest",
    "RankedItem",
    "RerankBatch",
    "RerankClient",
    "RerankError",
    "RerankResult",
    "RerankJob",
    "RerankTimeout",
    "ScoringInfo",
    "Settings",
    "TASK_CHUNKS",
    "TASK_DOCUMENTS",
    "TASK_PASSAGES",
    "TaskTimedOut",
    "TwoStageResult",
    "WorkerError",
]
