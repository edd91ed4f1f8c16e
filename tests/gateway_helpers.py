"""A real `rerank-gateway` process for the tests: started as a user starts it, on a free port, with its log captured."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.helpers import free_port, terminate

KEY = "test-key-7f3a9c"
"""An API key every test gateway accepts (from RERANK_GATEWAY_API_KEYS)."""

FILE_KEY = "file-key-b21d0e"
"""A second key, read from the gateway's key file (a mounted secret in production)."""


def memory(pid: int, field: str = "VmRSS") -> int:
    """A process's memory figure from /proc in bytes: VmRSS (now) or VmHWM (peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"no {field} for process {pid}")


class Gateway:
    """`python -m gateway.cli` against the test Redis, configured by `env` (RERANK_* and RERANK_GATEWAY_*)."""

    def __init__(self, workdir: Path, broker_url: str, model: Path, env: dict[str, str] | None = None, descriptors: int | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        keys_file = workdir / "gateway-keys"
        keys_file.write_text(f"# one key a line\n{FILE_KEY}\n")
        environment = {
            **os.environ,
            "RERANK_BROKER_URL": broker_url,
            "RERANK_MODEL": str(model),
            "RERANK_GATEWAY_API_KEYS": KEY,
            "RERANK_GATEWAY_API_KEYS_FILE": str(keys_file),
            "RERANK_GATEWAY_FLEET_INTERVAL": "1",
            "RERANK_GATEWAY_DEPTH_INTERVAL": "0.05",
            **(env or {}),
        }
        self.log = workdir / f"gateway-{self.port}.log"
        self._log = self.log.open("wb")
        limit = None if descriptors is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (descriptors, descriptors))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "--port", str(self.port)], env=environment, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=limit
        )
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)

    def peak_memory(self, reset: bool = False) -> int:
        """The process's peak resident memory in bytes since the last reset (Linux's VmHWM); `reset` starts anew."""
        if reset:
            Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
        return memory(self.process.pid, "VmHWM")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until(self, path: str, status: int = 200, timeout: float = 60) -> None:
        """Block until GET `path` answers `status` (e.g. /health 200, /ready 200 or 503)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.output()}")
            try:
                if self.http.get(path).status_code == status:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"GET {path} did not answer {status} within {timeout}s:\n{self.output()}")

    def stop(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            terminate(self.process, grace=10)
        self._log.close()
