"""Refuse to serve from a Redis that may evict keys: Celery's queues and results are plain keys."""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from redis.exceptions import RedisError

from contract.errors import redact

log = logging.getLogger(__name__)


def eviction_verdict(policy: str | None) -> tuple[str, str] | None:
    """("refuse" | "warn", why) for a `maxmemory-policy`, or None when nothing can be evicted."""
    if policy is None or policy == "noeviction":
        return None
    if policy.startswith("allkeys"):
        return "refuse", (
            f"maxmemory-policy is {policy}: when Redis fills up it deletes queued jobs and results silently; "
            "set `maxmemory-policy noeviction` (full Redis then refuses writes loudly)"
        )
    return "warn", (
        f"maxmemory-policy is {policy}: when Redis fills up it deletes results before RERANK_RESULT_EXPIRES "
        "and callers wait for them in vain; set `maxmemory-policy noeviction`"
    )


def read_policy(client: Any) -> str | None:
    """The server's maxmemory-policy; None where CONFIG is disabled (managed Redis) and it cannot be read."""
    try:
        return client.config_get("maxmemory-policy").get("maxmemory-policy")
    except RedisError as e:
        log.warning("cannot read Redis's maxmemory-policy (%s); make sure it is noeviction", e)
        return None


class EvictionCheck(bootsteps.StartStopStep):
    """Before the pool starts: exit 1 on a broker or result Redis that evicts any key, warn on one that evicts results."""

    requires = {"celery.worker.components:Hub"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        """Ask each Redis this worker uses for its eviction policy (a Redis that is down is left to the consumer's retries)."""
        super().__init__(parent, **kwargs)
        app = parent.app
        policies = {}
        try:
            if str(app.conf.broker_url).startswith("redis"):
                with app.connection_for_read() as connection:
                    policies[app.conf.broker_url] = read_policy(connection.default_channel.client)
            if "redis" in str(app.conf.result_backend):
                policies[app.backend.url] = read_policy(app.backend.client)
        except Exception as e:  # noqa: BLE001 - an unreachable Redis is the consumer's to retry, not this step's to judge
            log.info("could not check Redis's eviction policy at start-up: %s", e)
            return
        for url, policy in policies.items():
            verdict = eviction_verdict(policy)
            if verdict is None:
                continue
            action, why = verdict
            if action == "refuse":
                log.critical("refusing to start: Redis at %s: %s", redact(url), why)
                raise SystemExit(f"rerank-worker: Redis at {redact(url)}: {why}")
            log.warning("Redis at %s: %s", redact(url), why)
