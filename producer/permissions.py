"""Which of the Redis commands and keys this service uses the connected Redis user may not run (Redis ACLs).

A user without a command it needs (EVAL, say) would otherwise fail deep inside kombu or Celery with
a traceback at the first task. `missing` runs every command the producers, workers and gateway
use, in harmless forms, on scratch keys named like the real ones, and reports each refusal
(NOPERM); `advice` turns them into the one line an operator acts on.
"""

from __future__ import annotations

import uuid
from typing import Any

from redis.exceptions import NoPermissionError, ResponseError

KEY_PATTERNS = ("rerank.*", "celery-task-meta-*", "celery-taskset-meta-*", "unacked*", "_kombu.*")
"""The key names the service reads and writes: queues, held sets, leases, stored requests, results, kombu's bookkeeping."""


def probes(tag: str) -> list[tuple[str, tuple[Any, ...]]]:
    """(command, arguments) in harmless forms: each on a scratch key under one of KEY_PATTERNS, or on nothing."""
    key = f"rerank.probe.{tag}"
    return [
        ("EVAL", ("return 1", 0)),
        ("EVALSHA", ("e0e1f9fabfc9d4800c877a703b823ac0578ff8db", 0)),  # sha1 of 'return 1': NOSCRIPT is fine, NOPERM is not
        ("LPUSH", (key, "x")), ("LINDEX", (key, 0)), ("LLEN", (key,)), ("LTRIM", (key, 0, 0)), ("RPOP", (key,)),
        ("BLMOVE", (key, key, "RIGHT", "RIGHT", 0.001)),
        ("HSET", (f"{key}.h", "f", "v")), ("HGET", (f"{key}.h", "f")), ("HMGET", (f"{key}.h", "f")), ("HDEL", (f"{key}.h", "f")),
        ("ZADD", (f"{key}.z", 1, "m")), ("ZRANGE", (f"{key}.z", 0, -1)), ("ZSCORE", (f"{key}.z", "m")), ("ZREM", (f"{key}.z", "m")),
        ("SADD", (f"{key}.s", "m")), ("SMEMBERS", (f"{key}.s",)), ("SRANDMEMBER", (f"{key}.s", 1)), ("SREM", (f"{key}.s", "m")),
        ("SET", (f"celery-task-meta-probe-{tag}", "x", "EX", 60)), ("GET", (f"celery-task-meta-probe-{tag}",)),
        ("MGET", (f"celery-task-meta-probe-{tag}",)), ("GETRANGE", (f"celery-task-meta-probe-{tag}", 0, 1)),
        ("SETEX", (f"celery-taskset-meta-probe-{tag}", 60, "x")),
        ("TYPE", ("unacked",)), ("EXISTS", ("unacked_index",)), ("TTL", ("unacked_mutex",)), ("SMEMBERS", ("_kombu.binding.probe",)),
        ("EXPIRE", (key, 60)), ("RENAME", (f"celery-task-meta-probe-{tag}", f"celery-task-meta-probe-{tag}.x")),
        ("DEL", (f"celery-task-meta-probe-{tag}.x", f"celery-taskset-meta-probe-{tag}")),
        ("UNLINK", (key, f"{key}.h", f"{key}.z", f"{key}.s")),
        ("PUBLISH", (f"celery-task-meta-probe-{tag}", "x")), ("TIME", ()),
    ]


def missing(client: Any) -> list[str]:
    """The commands (and what they touch) that Redis refused this user with NOPERM; empty when everything may run."""
    refused = []
    for command, arguments in probes(uuid.uuid4().hex[:12]):
        try:
            client.execute_command(command, *arguments)
        except NoPermissionError as e:
            refused.append(f"{command} ({str(e)[:120]})")
        except ResponseError as e:  # another answer (NOSCRIPT, a wrong type) means the user may run it
            if "NOPERM" in str(e):
                refused.append(f"{command} ({str(e)[:120]})")
    return refused


def advice(user: str | None, refused: list[str]) -> str:
    """One line naming what the Redis user lacks and the ACL rule that grants it."""
    commands = sorted({entry.split(" ")[0].lower() for entry in refused})
    keys = " ".join(f"~{pattern}" for pattern in KEY_PATTERNS)
    name = user or "<user>"
    return (
        f"the Redis user {name!r} may not run {', '.join(refused)}; grant it with "
        f"ACL SETUSER {name} {' '.join('+' + c for c in commands)} {keys} &*"
    )
