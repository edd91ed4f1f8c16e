"""A real `rerank-gateway` process for the tests: started as a user starts it, on a free port, with its log captured."""

from __future__ import annotations

import os
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


class Gateway:
    """`python -m gateway.cli` against the test Redis, configured by `env` (RERANK_* and RERANK_GATEWAY_*)."""

    def __init__(self, workdir: Path, broker_url: str, model: Path, env: dict[str, str] | None = None) -> None:
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
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "--port", str(self.port)], env=environment, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)

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
