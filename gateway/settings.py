"""The gateway's own settings, read from ``RERANK_GATEWAY_*``; broker, model and limits stay ``RERANK_*``."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    """Configuration of one gateway process; every field maps to ``RERANK_GATEWAY_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="RERANK_GATEWAY_", extra="ignore", frozen=True, hide_input_in_errors=True)

    host: str = Field("127.0.0.1", description="Address to listen on; 0.0.0.0 in a container.")
    port: int = Field(8080, ge=1, le=65_535, description="Port to listen on.")
    api_keys: SecretStr | None = Field(None, description="Comma-separated API keys clients send as `Authorization: Bearer <key>`.")
    api_keys_file: Path | None = Field(None, description="File of API keys, one a line (a mounted secret); `#` starts a comment.")
    allow_anonymous: bool = Field(False, description="Serve without API keys; only behind another gate, never on an open network.")
    max_body_bytes: int = Field(8 * 2**20, ge=1024, le=2**30, description="Largest request body; larger ones get 413 before they are read.")
    max_documents: int = Field(1000, ge=1, le=500_000, description="Documents per rerank request; more get 422.")
    max_queue_depth: int = Field(1000, ge=0, description="Waiting messages on a model's queue above which requests get 429.")
    retry_after: int = Field(1, ge=1, le=3600, description="Seconds a 429 asks the client to wait (`Retry-After`).")
    wait_timeout: float = Field(60.0, gt=0, le=86_400, description="Seconds a request waits for its result before 504 with the job id.")
    fleet_interval: float = Field(10.0, gt=0, le=3600, description="Seconds between asking the workers which models they serve on which queues.")
    inspect_timeout: float = Field(1.0, gt=0, le=30, description="Seconds each of those broadcasts waits for replies.")
    depth_interval: float = Field(0.5, gt=0, le=60, description="Seconds between reads of the served models' queue depths.")
    head_timeout: float = Field(10.0, gt=0, le=3600, description="Seconds a connection may take to send a request's head (from connecting, or from its first byte on a kept-alive connection).")
    body_timeout: float = Field(60.0, gt=0, le=3600, description="Seconds a request's body may take to arrive; slower gets 408.")
    max_connections: int | None = Field(
        None, ge=16, le=1_000_000, description="Open connections at most; more evict the oldest idle ones. Unset: the descriptor limit less a reserve."
    )
    threads: int = Field(64, ge=4, le=1024, description="Threads for broker and result-backend calls (they block).")
    model_aliases: dict[str, str] = Field(
        default_factory=dict, description='JSON object of names clients send to models served, e.g. {"rerank-v3.5": "BAAI/bge-reranker-v2-m3"}.'
    )
