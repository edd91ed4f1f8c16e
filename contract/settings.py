"""One settings object, read from ``RERANK_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contract.names import DEFAULT_MODEL, model_queue

URL_SCHEMES = frozenset({"redis", "rediss", "sentinel", "amqp", "amqps", "pyamqp"})
"""Brokers and result backends this service is built and tested for."""


class Settings(BaseSettings):
    """Configuration for producers and workers; every field maps to ``RERANK_<NAME>``."""

    # hide_input_in_errors: a bad URL must not be echoed back, since it may hold a password.
    model_config = SettingsConfigDict(env_prefix="RERANK_", extra="ignore", frozen=True, hide_input_in_errors=True)

    # Transport
    broker_url: str | None = Field(
        None, description="Celery broker URL; unset runs every task inside the calling process."
    )
    result_backend: str | None = Field(None, description="Result backend URL; defaults to the broker URL.")
    queue: str = Field(
        "",
        min_length=1,
        description="Queue producers send to and workers consume (besides their model's interactive and bulk queues); "
        "unset: the model's own queue, `rerank.<model slug>`.",
    )

    # Model
    model: str = Field(DEFAULT_MODEL, min_length=1, description="Hub id or local directory: what workers serve and producers ask for.")
    model_revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="`cpu` or `cuda:N`.")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="`auto` is fp16 on CUDA and fp32 on CPU."
    )
    max_length: int = Field(512, ge=16, le=8192, description="Tokens per query+passage pair.")
    max_batch_tokens: int | None = Field(
        None, ge=256, le=4_194_304, description="Tokens per forward pass (with padded attention, padding included: batch x longest); unset: 2048 on CPU, 32768 on CUDA."
    )
    pad_multiple: int | None = Field(
        None, ge=1, le=512, description="Round each batch's width up to a multiple of this; unset: 64 on CUDA, 1 (no rounding) on CPU."
    )
    attention: Literal["packed", "padded"] | None = Field(
        None,
        description="`packed`: a batch's pairs as one unpadded token stream (variable-length attention); "
        "`padded`: pairs padded to the batch's longest; unset: packed on CPU and on CUDA with variable-length FlashAttention, else padded.",
    )
    torch_threads: int | None = Field(None, ge=1, le=512, description="Intra-op threads per worker process.")
    batch_tasks: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Tasks a worker holds at once and scores in shared forward passes (one process, Celery's threads pool); "
        "1: one task at a time per prefork process; unset: 1 (CUDA workers use host processes instead).",
    )
    host_processes: int | None = Field(
        None,
        ge=0,
        le=256,
        description="Prefork processes that decode, tokenize and write results for one device process that only scores "
        "(batching across their tasks); 0: none, each pool process loads the model; unset: 4 on CUDA, 0 on CPU.",
    )
    device_runner: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="`module:function(settings)` returning the device process's runner instead of the model: "
        "benchmarks use it for a simulated GPU (benchmarks/simulated_device.py); never set it to serve.",
    )

    # Reliability
    task_time_limit: int = Field(300, ge=5, le=86_400, description="Seconds before a task is killed.")
    visibility_timeout: int = Field(
        900, ge=10, le=86_400, description="Seconds before Redis redelivers an unacknowledged task."
    )
    worker_lease: float = Field(
        10.0,
        ge=0.5,
        le=3600.0,
        description="Seconds a worker's hold on the messages it took lasts unless renewed (every fifth of it); "
        "a dead worker's messages go back on their queues this long after it dies.",
    )
    sentinel_master: str | None = Field(
        None, min_length=1, description="Redis Sentinel's name for the master, with `sentinel://` broker and result URLs."
    )
    result_expires: int = Field(3600, ge=60, le=30 * 86_400, description="Seconds results stay in the backend.")
    worker_start_timeout: int = Field(
        600, ge=4, le=3600, description="Seconds a worker process may take to load the model."
    )

    # Request limits, enforced by the producer before queueing and again by the worker.
    max_candidates: int = Field(1000, ge=1, le=100_000, description="Candidates per stage-1 request.")
    max_chunks: int = Field(5000, ge=1, le=500_000, description="Chunks per stage-2 request, and passages per plain request.")
    max_text_chars: int = Field(100_000, ge=100, le=10_000_000, description="Characters per title, text or chunk.")
    max_query_chars: int = Field(2000, ge=10, le=100_000, description="Characters per query.")
    max_request_bytes: int = Field(
        64 * 2**20, ge=2**20, le=2**31, description="Bytes of JSON a request may take: a single stage's, or all a two-stage job keeps stored (so also the most any stored part may inflate to)."
    )
    request_expires: int = Field(
        86_400, ge=60, le=30 * 86_400, description="Seconds a job's stored request waits for its workers before Redis drops it."
    )

    # Producer
    stage1_windows: int = Field(
        1,
        ge=1,
        le=32,
        description="Stage 1 scores up to this many 1,500-character windows of each paper's text and keeps the best; 1 scores the abstract alone.",
    )

    # Fleet
    progress_interval: float = Field(
        1.0, ge=0.0, le=3600.0, description="Seconds between a running task's PROGRESS updates; 0 reports every batch."
    )
    task_events: bool = Field(
        True,
        description="Send task events (what Flower shows live): each task then costs a worker about 2 ms of CPU and Redis "
        "four more round trips (benchmarks/job_cost.py); turn off where no Flower watches.",
    )
    event_texts: bool = Field(
        False,
        description="Show task arguments and results (queries, passages) in task events, to Flower and every subscriber; "
        "off: events name their sizes only.",
    )
    metrics_port: int | None = Field(
        None, ge=1, le=65_535, description="Port a worker serves Prometheus metrics on (`/metrics`); unset: no metrics."
    )
    metrics_address: str = Field(
        "0.0.0.0",
        pattern=r"^[0-9A-Fa-f.:]+$",
        description="IP address the metrics port binds: every IPv4 interface by default, so a scraper on another host "
        "or pod reaches it; 127.0.0.1 keeps it on this host.",
    )
    metrics_token_file: str | None = Field(
        None, min_length=1, description="File holding a bearer token every scrape must send (`Authorization: Bearer …`); unset: no auth."
    )
    heartbeat_file: str | None = Field(
        None, min_length=1, description="File a worker touches every few seconds while its event loop runs (a liveness probe reads it); unset: none."
    )

    # Score cache (workers)
    score_cache: bool = Field(
        False, description="Keep every scored pair's logit in the result backend's Redis and serve it again to any request of this fleet (docs/operations.md)."
    )
    score_cache_ttl: int = Field(7 * 86_400, ge=60, le=365 * 86_400, description="Seconds a cached score lives (up to a quarter more).")
    score_cache_max_mb: int = Field(
        256, ge=1, le=1_048_576, description="Megabytes of Redis the cache may hold, counted at 128 bytes an entry; full, it takes nothing new until its oldest quarter expires."
    )
    score_cache_key: SecretStr | None = Field(
        None, min_length=32, description="The fleet's secret (at least 32 characters) that keys and signs cache entries; or RERANK_SCORE_CACHE_KEY_FILE."
    )
    score_cache_key_file: str | None = Field(None, min_length=1, description="A file holding the fleet's cache secret (a mounted secret).")

    @model_validator(mode="before")
    @classmethod
    def _queue_of_the_model(cls, data: Any) -> Any:
        # Unset (or empty) RERANK_QUEUE routes to the model's own queue, so a job is only ever
        # taken by a worker serving the model it asks for; an explicit queue wins, as before.
        if isinstance(data, dict) and not data.get("queue"):
            data = {**data, "queue": model_queue(str(data.get("model") or DEFAULT_MODEL))}
        return data

    @property
    def hosts(self) -> int:
        """Host processes feeding one device process: RERANK_HOST_PROCESSES, else 4 on CUDA (unless batching on threads) and 0 on CPU."""
        if self.host_processes is not None:
            return self.host_processes
        return 4 if self.device.startswith("cuda") and not self.batch_tasks else 0

    @property
    def tasks_in_hand(self) -> int:
        """Tasks one worker process holds at once: RERANK_BATCH_TASKS (threads pool), else 1."""
        return self.batch_tasks or 1

    @model_validator(mode="after")
    def _one_way_to_batch(self) -> Settings:
        if self.host_processes and (self.batch_tasks or 1) > 1:
            raise ValueError(
                "RERANK_HOST_PROCESSES and RERANK_BATCH_TASKS are two ways to batch across tasks: set one of them "
                "(host processes feeding a device process, or threads in one process)"
            )
        return self

    @field_validator("broker_url", "result_backend")
    @classmethod
    def _parseable_url(cls, url: str | None) -> str | None:
        if not url:  # an empty variable is an unset one
            return None
        # Redis Sentinel is addressed as several URLs, one per sentinel: sentinel://a:26379;sentinel://b:26379
        for part in url.split(";") if url.startswith("sentinel:") else [url]:
            _check_url(part)
        return url

    @model_validator(mode="after")
    def _sentinel_names_its_master(self) -> Settings:
        if not self.sentinel_master and any((url or "").startswith("sentinel:") for url in (self.broker_url, self.result_backend)):
            raise ValueError("sentinel:// URLs need RERANK_SENTINEL_MASTER, the name the sentinels monitor the master by")
        return self

    @model_validator(mode="after")
    def _visibility_outlasts_tasks(self) -> Settings:
        # With prefetch 1 a reserved message waits at most one running task before its own run,
        # so anything shorter than two time limits gets delivered twice.
        if self.visibility_timeout < 2 * self.task_time_limit:
            raise ValueError(
                f"RERANK_VISIBILITY_TIMEOUT ({self.visibility_timeout}s) must be at least twice "
                f"RERANK_TASK_TIME_LIMIT ({self.task_time_limit}s), or running tasks get delivered twice"
            )
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read once from the environment."""
    return Settings()


def _check_url(url: str) -> None:
    """Raise ValueError saying what is wrong with one broker or backend URL, never showing it (it may hold a password)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a password that swallowed the port
    except ValueError:
        raise ValueError(
            "is not a valid URL (not shown: it may hold a password); percent-encode any '#', '/', '?', '@' "
            "or ':' in the password, e.g. with urllib.parse.quote(password, safe='')"
        ) from None
    if parts.scheme not in URL_SCHEMES:
        raise ValueError(f"has scheme {parts.scheme!r}; use one of {', '.join(sorted(URL_SCHEMES))}")
    if not parts.hostname:
        raise ValueError("names no host (not shown: it may hold a password); percent-encode any '#', '/' or '?' in the password")
