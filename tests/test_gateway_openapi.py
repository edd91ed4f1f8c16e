"""The gateway's OpenAPI document is the truth: schemathesis, with every check it has, finds no response the
document does not describe and no request it describes that the gateway refuses (real gateway, real worker)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gateway_helpers import KEY, Gateway
from tests.helpers import skip_or_fail

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[1]

LIMITS = {
    # Small limits keep generated jobs quick on the tiny model; the document must carry them all.
    "RERANK_MAX_CANDIDATES": "4",
    "RERANK_MAX_TEXT_CHARS": "300",
    "RERANK_MAX_QUERY_CHARS": "200",
    "RERANK_GATEWAY_MAX_DOCUMENTS": "8",
}


def test_schemathesis_finds_no_mismatch_between_the_document_and_the_gateway(tmp_path, shared_worker, redis_server, tiny_model):
    command = Path(sys.executable).parent / "schemathesis"
    if not command.exists():
        skip_or_fail("schemathesis is not installed (the test extra)")
    # Given a gateway with its own limits, in front of a real worker
    gateway = Gateway(tmp_path, redis_server.url, tiny_model, LIMITS)
    try:
        gateway.wait_until("/ready")
        # When schemathesis runs every check on every operation, examples, boundaries, fuzzing and stateful sequences
        seed = os.environ.get("SCHEMATHESIS_SEED", "20261206")
        ran = subprocess.run(
            [
                str(command), "run", f"{gateway.url}/openapi.json", "--checks", "all", "-H", f"Authorization: Bearer {KEY}",
                "--max-examples", "12", "--seed", seed, "--request-timeout", "30", "--no-color",
            ],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT), "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks"},
        )
    finally:
        gateway.stop()
    # Then it finds nothing
    assert ran.returncode == 0, ran.stdout[-8000:] + ran.stderr[-2000:]
    assert "No issues found" in ran.stdout, ran.stdout[-3000:]
