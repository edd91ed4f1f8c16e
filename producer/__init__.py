"""The re-ranking contract (schemas, task names, errors, settings) and its client; no torch."""

from producer.client import RerankClient
from producer.errors import (
    BrokerUnavailable,
    InvalidRequest,
    ModelLoadError,
    RerankError,
    RerankTimeout,
    WorkerError,
)
from producer.names import DEFAULT_QUEUE, TASK_CHUNKS, TASK_DOCUMENTS
from producer.schemas import (
    Candidate,
    Chunk,
    ChunksRequest,
    DocumentsRequest,
    PaperChunk,
    RankedItem,
    RerankResult,
    ScoringInfo,
    TwoStageResult,
)
from producer.settings import Settings

__all__ = [
    "BrokerUnavailable",
    "Candidate",
    "Chunk",
    "ChunksRequest",
    "DEFAULT_QUEUE",
    "DocumentsRequest",
    "InvalidRequest",
    "ModelLoadError",
    "PaperChunk",
    "RankedItem",
    "RerankClient",
    "RerankError",
    "RerankResult",
    "RerankTimeout",
    "ScoringInfo",
    "Settings",
    "TASK_CHUNKS",
    "TASK_DOCUMENTS",
    "TwoStageResult",
    "WorkerError",
]
