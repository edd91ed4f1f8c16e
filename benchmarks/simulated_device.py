"""A simulated GPU for measuring the host side of a worker on any machine (benchmarks only, never used to serve).

A worker started with RERANK_DEVICE_RUNNER=benchmarks.simulated_device:runner scores with
`SimulatedRunner` instead of the model: each batch does the host work a real forward does before
the GPU (packing the batch's token ids into one buffer, as scoring/packed.py does), then holds the
interpreter for the launch time (Python issuing ~400 kernels), then sleeps with the interpreter
released for tokens / rate (the GPU computing). Logits are a fixed function of each pair's ids, so
rankings are deterministic (they mean nothing).

Calibration (RERANK_SIM_* environment variables override it):
- rate: 607,306 tokens/s, the H200's in-process packed fp16 rate on the bge-reranker-v2-m3 shape
  (benchmarks/results/cuda-bge-reranker-v2-m3.md);
- launch: 3.0 ms per forward: ~400 kernel launches (24 layers) at ~7.5 µs of Python and driver
  time each, an estimate, not a measurement.
RERANK_SIM_STATS names a file where the runner keeps its totals (batches, busy seconds, tokens) as
three little-endian doubles, rewritten after every batch, for the benchmark to read.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Sequence
from typing import Any

import torch

from scoring.facts import Architecture, Weights
from scoring.packed import pack
from scoring.tokens import EncodedPair

RATE = 607_306.0
LAUNCH_SECONDS = 0.003


class SimulatedRunner:
    """A `Runner` that spends a GPU's time without one (see the module docstring)."""

    model = None
    attention = "packed"
    device = torch.device("meta")

    def __init__(self, settings: Any, rate: float = RATE, launch_seconds: float = LAUNCH_SECONDS) -> None:
        """Simulate `rate` tokens/s after `launch_seconds` of interpreter time per batch."""
        self.name = settings.model
        self.max_length = settings.max_length
        self.max_batch_tokens = settings.max_batch_tokens or 32768
        self.rate = float(os.environ.get("RERANK_SIM_RATE", rate))
        self.launch_seconds = float(os.environ.get("RERANK_SIM_LAUNCH_MS", launch_seconds * 1000)) / 1000
        self.dtype = torch.float16
        self.totals = [0.0, 0.0, 0.0]  # batches, busy seconds, tokens
        stats = os.environ.get("RERANK_SIM_STATS")
        self._stats = os.open(stats, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) if stats else None

    def batch_tokens(self, longest: int, count: int, total: int) -> int:
        """Packed: exactly the batch's tokens."""
        return total

    def run_batch(self, pairs: Sequence[EncodedPair]) -> tuple[torch.Tensor, int, int]:
        """Pack the ids, hold the interpreter for the launch time, sleep for the compute time; deterministic logits."""
        started = time.perf_counter()
        batch = pack(pairs, torch.device("cpu"), 2, False)
        tokens = int(batch.input_ids.numel())
        until = time.perf_counter() + self.launch_seconds
        while time.perf_counter() < until:  # the interpreter stays held, as it is while kernels are launched
            pass
        time.sleep(tokens / self.rate)
        logits = torch.tensor([float(sum(p.input_ids[-8:]) % 997) / 100 for p in pairs], dtype=torch.float32)
        self.totals[0] += 1
        self.totals[1] += time.perf_counter() - started
        self.totals[2] += tokens
        if self._stats is not None:
            os.pwrite(self._stats, struct.pack("<3d", *self.totals), 0)
        return logits, tokens, 1

    def weights(self) -> Weights:
        """No weights: a simulated device at its rate and launch time."""
        kind = f"simulated ({self.rate:,.0f} tokens/s, {self.launch_seconds * 1000:g} ms launches)"
        return Weights(path=f"simulated ({self.name})", bytes=0, architecture=Architecture(model_type=kind))


def runner(settings: Any) -> SimulatedRunner:
    """RERANK_DEVICE_RUNNER entry point."""
    return SimulatedRunner(settings)


def read_stats(path: str) -> tuple[float, float, float]:
    """(batches, busy seconds, tokens) the simulated device has run so far."""
    try:
        with open(path, "rb") as file:
            data = file.read(24)
    except OSError:
        return (0.0, 0.0, 0.0)
    return struct.unpack("<3d", data) if len(data) == 24 else (0.0, 0.0, 0.0)
