"""Liveness: a worker touches RERANK_HEARTBEAT_FILE from its event loop; `rerank-worker alive` checks its age.

Readiness asks the worker over the broker (`celery inspect ping`), which says nothing when Redis
is briefly away and would restart every worker at once if used for liveness. The heartbeat
needs no broker: it stops when the worker's main loop stops turning (a hung consumer, a
reconnect that never ends), which is when a restart helps.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from celery import bootsteps

from producer.app import settings_of

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 5.0
"""Seconds between two touches of the heartbeat file."""


class HeartbeatStep(bootsteps.StartStopStep):
    """With RERANK_HEARTBEAT_FILE set: touches it every HEARTBEAT_INTERVAL seconds on the worker's timer."""

    requires = {"celery.worker.components:Timer"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        """Read where to beat; without a file the step is off."""
        super().__init__(parent, **kwargs)
        path = settings_of(parent.app).heartbeat_file
        self.path = Path(path) if path else None
        self.enabled = self.path is not None
        self.timer_ref: Any = None

    def start(self, parent: Any) -> None:
        """Beat now, then on the worker's timer (the event loop's, where there is one)."""
        self._beat()
        self.timer_ref = parent.timer.call_repeatedly(HEARTBEAT_INTERVAL, self._beat, priority=10)

    def stop(self, parent: Any) -> None:
        """Stop beating and remove the file, so a stopped worker is not taken for a live one."""
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.timer_ref = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    terminate = stop

    def _beat(self) -> None:
        if self.path is None:
            return
        try:
            self.path.touch()
        except OSError:
            log.warning("cannot touch the heartbeat file %s", self.path, exc_info=True)


def alive_main(argv: list[str]) -> int:
    """`rerank-worker alive`: exit 0 when the heartbeat file was touched within --max-age seconds, else 1."""
    parser = argparse.ArgumentParser(prog="rerank-worker alive", description="Liveness probe: is the worker's event loop turning?")
    parser.add_argument("--max-age", type=float, default=120.0, help="Seconds the heartbeat may be old (default 120).")
    parser.add_argument("--file", help="Heartbeat file (default: RERANK_HEARTBEAT_FILE).")
    args = parser.parse_args(argv)
    from contract.settings import Settings

    path = args.file or Settings().heartbeat_file
    if not path:
        print("rerank-worker alive: set RERANK_HEARTBEAT_FILE (or --file) on the worker and here", file=sys.stderr)
        return 2
    try:
        age = time.time() - Path(path).stat().st_mtime
    except OSError as e:
        print(f"rerank-worker alive: no heartbeat at {path}: {e.strerror}", file=sys.stderr)
        return 1
    if age > args.max_age:
        print(f"rerank-worker alive: last heartbeat {age:.0f}s ago, over --max-age {args.max_age:.0f}s", file=sys.stderr)
        return 1
    return 0
