"""The error hierarchy shared by the producer and the workers, and the one place that maps
what Celery, kombu and redis raise onto it.

Workers raise these too; Celery sends them back as JSON (type, module, message) and the
producer re-raises the same class, so every message must be a plain string.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from celery.exceptions import TaskRevokedError
from kombu.exceptions import OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError


class RerankError(Exception):
    """Base class of every error this project raises on purpose."""


class InvalidRequest(RerankError, ValueError):
    """The request is malformed or breaks a limit; fix the input, retrying will not help."""


class ModelLoadError(RerankError):
    """The model or tokenizer could not be loaded; fix the model id, path or device."""


class WorkerError(RerankError):
    """A worker failed while scoring; the message names the cause."""


class RerankTimeout(RerankError, TimeoutError):
    """No result arrived in time; the job may still finish later."""


class BrokerUnavailable(RerankError, ConnectionError):
    """The broker or result backend cannot be reached; check the URL and that it is running."""


class JobCancelled(RerankError):
    """The job was cancelled (revoked) before it finished; submit it again if you still need it."""


class TaskTimedOut(RerankTimeout):
    """The worker stopped the task at RERANK_TASK_TIME_LIMIT; it will not finish, so split the request."""


_UNREACHABLE = (OperationalError, ConnectionError, RedisConnectionError, RedisTimeoutError)


def translate(error: BaseException, what: str, url: str | None = None) -> RerankError:
    """Map an error met while `what` (e.g. "following job 1f3…") onto our hierarchy.

    `url` is the broker or backend being talked to; it appears redacted in the message.
    """
    if isinstance(error, RerankError):
        return error
    if isinstance(error, TaskRevokedError):
        return JobCancelled(f"{what}: the job was cancelled before it finished")
    if isinstance(error, OutOfMemoryError) or "used memory > 'maxmemory'" in str(error):
        return BrokerUnavailable(
            f"{what}: Redis at {redact(url)} is out of memory (used memory is above its maxmemory) and refuses "
            "new jobs: free memory or raise maxmemory, and keep maxmemory-policy at noeviction"
        )
    if "WRONGTYPE" in str(error):
        return BrokerUnavailable(
            f"{what}: a key this needs in Redis at {redact(url)} holds another type than Celery writes there (someone wrote "
            "into it); a worker consuming the queue moves a queue's misplaced key aside when it next looks, or rename it "
            "yourself, then send again"
        )
    # Celery raises a bare RuntimeError when it cannot subscribe to a result in the backend.
    if isinstance(error, _UNREACHABLE) or (isinstance(error, RuntimeError) and "result store" in str(error)):
        return BrokerUnavailable(
            f"{what}: cannot reach {redact(url)}: {error}; check RERANK_BROKER_URL and "
            "RERANK_RESULT_BACKEND, and that the broker and Redis are running"
        )
    return WorkerError(f"{what}: {type(error).__name__}: {error}")


@contextmanager
def reaching(what: str, url: str | None) -> Iterator[None]:
    """Run a call to the broker or result backend, re-raising "cannot reach it" as `BrokerUnavailable`."""
    try:
        yield
    except (OperationalError, OSError, RedisError, RuntimeError) as e:
        error = translate(e, what, url)
        if not isinstance(error, BrokerUnavailable):
            raise
        raise error from e


def redact(url: str | None) -> str:
    """Return `url` with its password replaced by ``**``; never raises, never leaks a character of it."""
    if not url:
        return "<unset>"
    if ";" in url and url.startswith("sentinel:"):
        return ";".join(redact(part) for part in url.split(";"))
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        # A password holding '#', '/' or '?' unescaped makes the URL unparseable; say so, show nothing.
        return f"{url.split(':', 1)[0]}://<unparseable URL; percent-encode special characters in the password>"
    user = parts.username or ""
    credentials = f"{user}:**@" if parts.password is not None else (f"{user}@" if user else "")
    return f"{parts.scheme}://{credentials}{host}{port}{parts.path}"
