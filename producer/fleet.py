"""Which workers answer, which queues they consume and which tasks they serve (Celery's inspect)."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import Celery
from pydantic import BaseModel, ConfigDict, Field

from contract.names import REPORT_COMMAND
from producer.reaching import reaching

log = logging.getLogger(__name__)


class WorkerInfo(BaseModel):
    """One worker as it answered the broadcast."""

    model_config = ConfigDict(frozen=True)

    name: str
    queues: list[str]
    registered: list[str]
    processes: int | None = Field(None, description="Pool processes (concurrency).")
    pid: int | None = None
    uptime_s: int | None = None
    tasks_done: int | None = Field(None, description="Tasks this worker has run, by its own count.")
    report: dict[str, Any] | None = Field(None, description=f"The worker's `{REPORT_COMMAND}` answer, when it has that command.")


def inspect_workers(app: Celery, timeout: float = 2.0) -> list[WorkerInfo]:
    """Broadcast Celery's standard inspect commands (and `rerank_report`) and merge the replies by worker.

    Raises:
        BrokerUnavailable: the broker cannot be reached.
    """
    asks = {
        "queues": lambda inspector: inspector.active_queues(),
        "stats": lambda inspector: inspector.stats(),
        "registered": lambda inspector: inspector.registered(),
        "reports": _reports,
    }
    # Each broadcast waits out `timeout` for replies: the four wait at once, not one after the other.
    with reaching("asking the workers", app.conf.broker_url), ThreadPoolExecutor(len(asks)) as pool:
        futures = {name: pool.submit(ask, app.control.inspect(timeout=timeout)) for name, ask in asks.items()}
        replies = {name: future.result() or {} for name, future in futures.items()}
    return merge_replies(replies["queues"], replies["stats"], replies["registered"], replies["reports"])


def merge_replies(queues: Any, stats: Any, registered: Any, reports: Any) -> list[WorkerInfo]:
    """One WorkerInfo per worker that answered; a reply that is not a worker's (anyone can write one) is logged and left out."""
    replies = [r if isinstance(r, dict) else {} for r in (queues, stats, registered, reports)]
    queues, stats, registered, reports = replies
    workers = []
    for name in sorted(set(queues) | set(stats) | set(registered)):
        try:
            stat = stats.get(name) or {}
            pool = stat.get("pool") or {}
            totals = stat.get("total") or {}
            workers.append(
                WorkerInfo(
                    name=name,
                    queues=sorted(q["name"] for q in queues.get(name) or []),
                    registered=sorted(registered.get(name) or []),
                    processes=pool.get("max-concurrency"),
                    pid=stat.get("pid"),
                    uptime_s=stat.get("uptime"),
                    tasks_done=sum(totals.values()) if totals else (0 if stat else None),
                    report=reports.get(name),
                )
            )
        except (AttributeError, KeyError, TypeError, ValueError) as e:  # pydantic's ValidationError is a ValueError
            log.warning("ignored a reply from %.80r that is not a worker's: %.200s", name, e)
    return workers


def _reports(inspector: Any) -> dict[str, dict[str, Any]]:
    # Workers without the command answer {"error": ...}; keep only real reports.
    replies = inspector._request(REPORT_COMMAND) or {}
    return {
        name: reply for name, reply in replies.items() if isinstance(reply, dict) and reply and "error" not in reply
    }
