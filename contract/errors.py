"""The error hierarchy shared by producers, workers, the scoring core and the gateway.

Workers raise these too; Celery sends them back as JSON (type, module, message) and the
producer re-raises the same class, so every message must be a plain string. What Celery, kombu
and redis raise is mapped onto this tree by `producer.reaching`.
"""

from __future__ import annotations

from urllib.parse import urlsplit


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
