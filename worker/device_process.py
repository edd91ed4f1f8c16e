"""Starting, watching and stopping a worker's device process (scoring/device.py), when RERANK_HOST_PROCESSES > 0.

The worker's parent starts it before the prefork pool forks (so the parent itself never touches
CUDA) and waits until it has loaded the model; every pool process then connects to it. If it
dies, the worker cannot score: the parent kills its pool processes and exits with code 1, so
the tasks they held go back to their queues (their lease lapses) and a process manager restarts
the worker.
"""

from __future__ import annotations

import logging
import os
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from contract.errors import ModelLoadError
from contract.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceAddress:
    """Where host processes reach the device process: a Unix socket path and the key its handshake needs."""

    path: str
    authkey: bytes


class DeviceProcess:
    """The running device process of this worker."""

    def __init__(self, settings: Settings) -> None:
        """Start `python -m scoring.device`, hand it its key and this worker's settings, and wait until it serves (or fails to load)."""
        self._directory = tempfile.mkdtemp(prefix="rerank-device-")  # 0700: only this user can reach the socket
        self.address = DeviceAddress(str(Path(self._directory) / "device.sock"), secrets.token_bytes(32))
        self.stopping = False
        self.process = subprocess.Popen(
            [sys.executable, "-m", "scoring.device", "--address", self.address.path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent,
        )
        self.process.stdin.write(self.address.authkey.hex() + "\n" + settings.model_dump_json(exclude={"score_cache_key"}) + "\n")
        self.process.stdin.close()
        ready, _, _ = select.select([self.process.stdout], [], [], settings.worker_start_timeout)
        line = self.process.stdout.readline() if ready else ""
        if line.strip() != "ready":
            # The end of its output (a closed pipe) means it is exiting, though poll() may not see it yet.
            exited = (bool(ready) and not line) or self.process.poll() is not None
            self.process.kill()
            self.process.wait()
            raise ModelLoadError(
                f"the device process failed to load the model (exit code {self.process.returncode}); the traceback above says why"
                if exited else
                f"the device process did not load the model within RERANK_WORKER_START_TIMEOUT ({settings.worker_start_timeout}s); "
                "raise it, or see the log above"
            )
        threading.Thread(target=self._watch, name="device-watch", daemon=True).start()

    def _watch(self) -> None:
        code = self.process.wait()
        if self.stopping:
            return
        log.critical("the device process exited with code %s; stopping this worker (code 1) so its tasks are delivered again", code)
        _kill_children()
        logging.shutdown()
        os._exit(1)

    def stop(self) -> None:
        """End the device process (at worker shutdown, after the pool has stopped)."""
        self.stopping = True
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        Path(self.address.path).unlink(missing_ok=True)
        Path(self._directory).rmdir()


def _die_with_parent() -> None:
    """In the device process, before exec: SIGKILL it when the worker's parent dies (Linux), so a killed worker leaves no process holding the GPU."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _kill_children() -> None:
    """SIGKILL every child of this process (its pool processes), so none acknowledges a task it can no longer score."""
    for task in Path("/proc/self/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in children:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
