"""What Celery, kombu and redis raise while talking to the broker or result backend, mapped onto the contract's errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from celery.exceptions import TaskRevokedError
from kombu.exceptions import OperationalError
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from contract.errors import (
    BrokerUnavailable,
    JobCancelled,
    RerankError,
    WorkerError,
    redact,
)

_UNREACHABLE = (OperationalError, ConnectionError, RedisConnectionError, RedisTimeoutError)
_REFUSED = ("WRONGPASS", "NOAUTH", "invalid username-password", "Authentication required", "invalid password")


def refused_credentials(error: BaseException) -> bool:
    """Whether `error` (or what it wraps: kombu wraps redis's errors) is Redis refusing the user or password."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, AuthenticationError) or any(sign in str(current) for sign in _REFUSED):
            return True
        current = current.__cause__ or current.__context__
    return False


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
    if refused_credentials(error):
        return BrokerUnavailable(
            f"{what}: Redis at {redact(url)} refused the password (authentication failed: {error}); set the right "
            "password in RERANK_BROKER_URL (and in RERANK_RESULT_BACKEND, if set), percent-encoded"
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
