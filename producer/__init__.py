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
from producer.aio import AsyncRerankClient
from producer.client import RerankClient
from producer.jobs import BatchProgress, JobProgress, RerankBatch, RerankJob

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
