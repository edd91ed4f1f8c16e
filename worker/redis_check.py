"""Before a worker serves: refuse a Redis that refuses the password, that may evict keys (Celery's queues and results are
plain keys), or whose user may not run a command the service needs (Redis ACLs: said in one line, with the rule that grants it)."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from celery import bootsteps
from redis.exceptions import RedisError

from contract.errors import redact
from producer import permissions
from producer.reaching import refused_credentials
from worker.cli import refuse_to_start

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


class RedisCheck(bootsteps.StartStopStep):
    """Before the pool starts: exit 2 on a broker or result Redis that refuses the password, evicts any key or refuses a command we need; warn on one that evicts results."""

    requires = {"celery.worker.components:Hub"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        """Ask each Redis this worker uses for its eviction policy and this user's permissions (a Redis that is down is left to the consumer's retries)."""
        super().__init__(parent, **kwargs)
        app = parent.app
        policies, refusals = {}, {}
        url = app.conf.broker_url
        try:
            clients = {}
            if str(app.conf.broker_url).startswith("redis"):
                with app.connection_for_read() as connection:
                    clients[url] = connection.default_channel.client
                    policies[url] = read_policy(clients[url])
                    refusals[url] = permissions.missing(clients[url])
            if "redis" in str(app.conf.result_backend):
                url = app.backend.url
                policies[url] = read_policy(app.backend.client)
                refusals[url] = permissions.missing(app.backend.client)
        except Exception as e:  # noqa: BLE001 - an unreachable Redis is the consumer's to retry, not this step's to judge
            if refused_credentials(e):  # retrying would never help; Celery would retry for ever, saying "cannot connect"
                log.critical("refusing to start: Redis at %s refused the password: %s", redact(url), e)
                refuse_to_start(
                    f"Redis at {redact(url)} refused the password ({e}); set the right password in RERANK_BROKER_URL "
                    "(and in RERANK_RESULT_BACKEND, if set), percent-encoded"
                )
            log.info("could not check Redis's eviction policy and permissions at start-up: %s", e)
            return
        for url, refused in refusals.items():
            if refused:
                line = permissions.advice(urlsplit(url).username or "default", refused)
                log.critical("refusing to start: Redis at %s: %s", redact(url), line)
                refuse_to_start(f"Redis at {redact(url)}: {line}")
        for url, policy in policies.items():
            verdict = eviction_verdict(policy)
            if verdict is None:
                continue
            action, why = verdict
            if action == "refuse":
                log.critical("refusing to start: Redis at %s: %s", redact(url), why)
                refuse_to_start(f"Redis at {redact(url)}: {why}")
            log.warning("Redis at %s: %s", redact(url), why)
