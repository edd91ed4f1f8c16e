"""The error hierarchy shared by the producer and the workers.

Workers raise these too; Celery sends them back as JSON (type, module, message) and the
producer re-raises the same class, so every message must be a plain string.
"""


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
