"""The worker's message consumer: Celery's, behind a gate that lets through only our tasks, well formed.

Anyone who can write to the queue can send any bytes, headers or task name. Celery parses a
message's protocol headers in the consumer before any task code runs, and some malformed headers
make it reconnect forever or stop the worker; every worker also registers Celery's builtin tasks
(`celery.chord_unlock` retries forever). So each message is checked here first: a message that is
not one of the app's own tasks (`rerank.documents`, `rerank.chunks`) with well-typed headers and
an `[args, kwargs, embed]` body is acknowledged and dropped (never restored), logged as one line, and, where it carries a
usable task id, that task's result is marked failed with `InvalidRequest`, so whoever waits on it
learns why at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from celery.worker.consumer import Consumer
from vine import promise

from contract.errors import InvalidRequest
from contract.names import TASK_CHUNKS, TASK_DOCUMENTS
from contract.plain import plain_json, short
from worker.transport import REFUSED_HEADER

log = logging.getLogger(__name__)

MAX_ID_CHARS = 255


def _identifier(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _seconds(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf"))


def _time_limits(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(_seconds(v) for v in value)


def _iso_time(value: Any) -> bool:
    try:
        datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return False
    return True


# What Celery reads from protocol-2 headers, and the types it assumes without checking.
HEADER_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "id": (_identifier, f"a non-empty string of at most {MAX_ID_CHARS} characters"),
    "root_id": (_optional(_identifier), "a task id or null"),
    "parent_id": (_optional(_identifier), "a task id or null"),
    "group": (_optional(_identifier), "a group id or null"),
    "group_index": (_optional(_count), "a count or null"),
    "shadow": (_optional(lambda v: isinstance(v, str)), "a string or null"),
    "timelimit": (_optional(_time_limits), "[soft, hard] seconds or null"),
    # A message held until its eta stays unacknowledged, and Redis delivers it again every
    # visibility timeout: a task could run any number of times. Our producers never delay.
    "eta": (lambda v: v is None, "null: delayed messages (eta, countdown) are refused"),
    "expires": (_optional(_iso_time), "an ISO 8601 time or null"),
    "retries": (_optional(_count), "a count or null"),
    "argsrepr": (_optional(lambda v: isinstance(v, str)), "a string or null"),
    "kwargsrepr": (_optional(lambda v: isinstance(v, str)), "a string or null"),
    "origin": (_optional(lambda v: isinstance(v, str)), "a string or null"),
    "ignore_result": (_optional(lambda v: isinstance(v, bool)), "true, false or null"),
    "replaced_task_nesting": (_optional(_count), "a count or null"),
    "stamped_headers": (_optional(lambda v: isinstance(v, list)), "a list or null"),
    "stamps": (_optional(lambda v: isinstance(v, dict)), "an object or null"),
}


def header_refusal(headers: Any, served: frozenset[str]) -> str | None:
    """Why these protocol headers must not reach Celery, or None when they may; `served` are the task names accepted."""
    if not isinstance(headers, dict):
        return f"its headers are a {type(headers).__name__}, not an object"
    if REFUSED_HEADER in headers:
        return str(headers[REFUSED_HEADER])[:200]
    if "task" not in headers:
        return "it has no `task` header (only protocol-2 task messages are accepted)"
    task = headers["task"]
    if not isinstance(task, str) or task not in served:
        return f"task {short(task)} is not served here (only {', '.join(sorted(served))})"
    if "id" not in headers:
        return "it has no `id` header"
    for name, (valid, expected) in HEADER_RULES.items():
        if name in headers and not valid(headers[name]):
            return f"header `{name}` is {short(headers[name])}, expected {expected}"
    return None


def body_refusal(task: str, payload: Any) -> str | None:
    """Why a decoded protocol-2 body must not run, or None when it may.

    Follow-up work travels in the body's embed: stage 1 may name stage 2 once as its chain;
    nothing else may chain, call back or join (we send no callbacks, errbacks or chords).
    """
    if not (isinstance(payload, list) and len(payload) == 3):
        return "its body is not [args, kwargs, embed]"
    args, kwargs, embed = payload
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict) or not isinstance(embed, dict):
        return "its body is not [args (a list), kwargs (an object), embed (an object)]"
    for key in ("callbacks", "errbacks", "chord"):
        if embed.get(key):
            return f"it carries {key}, which this service never sends"
    chain = embed.get("chain") or []
    if not isinstance(chain, list):
        return "its chain is not a list"
    allowed = 1 if task == TASK_DOCUMENTS else 0
    if len(chain) > allowed or any(not isinstance(step, dict) or step.get("task") != TASK_CHUNKS for step in chain):
        return f"its chain {short([s.get('task') if isinstance(s, dict) else s for s in chain])} is not one {TASK_CHUNKS} after {TASK_DOCUMENTS}"
    return None


MAX_BODY_DEPTH = 32
"""How deeply a task body may nest: ours nest at most 8 deep."""


def decoded_body(message: Any) -> tuple[Any, str | None]:
    """The message's body decoded as plain JSON (what its task's arguments will be), or None and why it must not run.

    kombu's own decoder would turn `{"__type__": ..., "__value__": ...}` into bytes, datetimes, UUIDs
    and decimals, and accept any depth; this is the one decoder of untrusted bytes (contract.plain).
    """
    if message.content_type != "application/json" or (message.content_encoding or "utf-8").lower() != "utf-8":
        return None, f"its content is {short(message.content_type)} in {short(message.content_encoding)}; only UTF-8 JSON is accepted"
    try:
        return plain_json(message.body, "its body", max_depth=MAX_BODY_DEPTH), None
    except InvalidRequest as e:
        return None, str(e)


class RerankConsumer(Consumer):
    """Celery's consumer behind the gate above; it also fails the task of a message it cannot decode."""

    def create_task_handler(self, promise: Any = promise) -> Callable[[Any], Any]:
        """Celery's task handler, called only for messages that pass the gate."""
        handle = super().create_task_handler(promise)
        # The tasks this app registered itself: ours (and a benchmark's no-op), never Celery's builtins.
        served = frozenset(name for name in self.app.tasks if not name.startswith("celery."))

        def on_task_received(message: Any) -> Any:
            headers = getattr(message, "headers", None)
            reason = header_refusal(headers, served)
            if reason is None:
                payload, reason = decoded_body(message)
                if reason is None:
                    reason = body_refusal(headers["task"], payload)
                    # Celery reads the arguments from here: kombu's decoder need not run in this process.
                    message._decoded_cache = payload
            if reason is not None:
                return self._refuse(message, reason)
            try:
                return handle(message)
            except self.connection_errors:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever else Celery cannot parse must not stop consuming
                return self._refuse(message, f"Celery could not parse it: {type(exc).__name__}: {short(str(exc))}")

        return on_task_received

    def _refuse(self, message: Any, reason: str) -> None:
        headers = getattr(message, "headers", None)
        task_id = headers.get("id") if isinstance(headers, dict) else None
        log.warning("Refused message %s: %s; acknowledged and dropped", short(task_id), reason)
        message.ack_log_error(log, self.connection_errors)
        self._fail(message, f"was refused and dropped: {reason}")

    def _fail(self, message: Any, what: str) -> None:
        headers = getattr(message, "headers", None)
        task_id = headers.get("id") if isinstance(headers, dict) else None
        if not _identifier(task_id):
            return
        error = InvalidRequest(f"message {task_id} {what}; send requests as JSON through producer.RerankClient")
        try:
            # Never overwrite a finished task's result: a forged message may reuse a real job's id.
            if self.app.backend.get_task_meta(task_id)["status"] == "PENDING":
                self.app.backend.mark_as_failure(task_id, error)
        except Exception:  # the message is already gone; failing to report it must not stop the worker
            log.warning("could not store the failure of refused task %s", task_id, exc_info=True)
