"""The re-ranking contract (schemas, task names, errors, settings) and its client; no torch."""

from producer.aio import AsyncRerankClient
from producer.client import RerankClient
from producer.errors import (
    BrokerUnavailable,
    InvalidRequest,
    JobCancelled,
    ModelLoadError,
    RerankError,
    RerankTimeout,
    TaskTimedOut,
    WorkerError,
)
from producer.jobs import BatchProgress, JobProgress, RerankBatch, RerankJob
from producer.names import DEFAULT_QUEUE, TASK_CHUNKS, TASK_DOCUMENTS, TASK_PASSAGES
from producer.schemas import (
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
from producer.settings import Settings

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
