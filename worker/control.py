"""Remote control a worker accepts: what Flower and `rerank workers` read, and cancelling a job; nothing that stops it.

Anyone who can write to the broker can broadcast a remote-control command to every worker.
Celery's own would let one message shut the fleet down, kill running tasks, cancel the queues
workers consume, throttle them to one task an hour, set one-second time limits or fork dozens of
pool processes that each load the model. Workers stop through their process manager (SIGTERM)
and are sized by configuration, so those commands are removed; `revoke` keeps its use (cancelling
queued work, `job.cancel()`) without its `terminate` option.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from celery.worker.control import Panel

log = logging.getLogger(__name__)

REMOVED = (
    "shutdown", "terminate", "pool_restart", "pool_grow", "pool_shrink", "autoscale",
    "add_consumer", "cancel_consumer", "rate_limit", "time_limit",
)
"""Remote-control commands a worker does not answer."""


def _without_terminate(revoke: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(revoke)
    def revoke_only(state: Any, *args: Any, terminate: bool = False, signal: Any = None, **kwargs: Any) -> Any:
        if terminate:
            log.warning("refused to terminate running tasks on a remote-control revoke; queued ones are revoked")
        return revoke(state, *args, terminate=False, **kwargs)

    return revoke_only


def restrict_remote_control() -> None:
    """Remove the commands in REMOVED and take `terminate` out of revoking, in this process."""
    for name in REMOVED:
        Panel.data.pop(name, None)
    for name in ("revoke", "revoke_by_stamped_headers"):
        if name in Panel.data and not hasattr(Panel.data[name], "__wrapped__"):
            Panel.data[name] = _without_terminate(Panel.data[name])
