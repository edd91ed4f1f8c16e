"""A loaded model on its device that runs the batches it is handed, and nothing else."""

from __future__ import annotations

import logging
from array import array
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from scoring.facts import Weights
from scoring.layouts import Forward, choose_layout
from scoring.model import weights_of
from scoring.packed import Fusions
from scoring.tokens import EncodedPair

log = logging.getLogger(__name__)

# Tokens per forward pass: small batches stay in a CPU's caches, GPUs need large ones to fill
# their cores (measured in benchmarks/sweep.py; docs/benchmarks.md).
DEFAULT_BATCH_TOKENS = {"cpu": 2048, "cuda": 32768}
# Batch widths (padded attention) round up to a multiple of this: a GPU is slow the first time it
# meets a shape, so CUDA workers see few and warm them all at load (benchmarks/fresh_shapes.py).
DEFAULT_PAD_MULTIPLE = {"cpu": 1, "cuda": 64}


class Runner(Protocol):
    """What the scheduler's drivers need of a device (a token budget, a way to run one batch), and what it computes with."""

    name: str
    device: torch.device
    dtype: torch.dtype
    attention: str
    max_length: int
    max_batch_tokens: int

    def batch_tokens(self, longest: int, count: int, total: int) -> int:
        """Tokens a batch of `count` pairs takes (padding included where the layout pads)."""

    def run_batch(self, pairs: Sequence[EncodedPair]) -> tuple[torch.Tensor, int, int]:
        """Fp32 logits of `pairs` (possibly still on the device), tokens taken, forward passes run."""

    def weights(self) -> Weights:
        """What the runner computes with: where its weights came from, their size, the network."""


class ModelRunner:
    """Runs planned batches through a loaded cross-encoder in one attention layout; splits a batch that runs out of memory."""

    def __init__(
        self, model: torch.nn.Module, *, name: str, device: str, max_length: int, pad_id: int, uses_type_ids: bool,
        attention: str, max_batch_tokens: int | None = None, pad_multiple: int | None = None, fusions: Fusions | None = None,
    ) -> None:
        """Wrap `model` (already on `device`, in eval mode)."""
        self.model = model
        self.name = name
        self.device = torch.device(device)
        self.max_length = max_length
        self.pad_id = pad_id
        self.max_batch_tokens = max_batch_tokens or DEFAULT_BATCH_TOKENS[self.device.type]
        self.pad_multiple = pad_multiple or DEFAULT_PAD_MULTIPLE[self.device.type]
        self.layout: Forward = choose_layout(
            attention, model, name=name, device=self.device, pad_id=pad_id, pad_multiple=self.pad_multiple,
            max_length=max_length, uses_type_ids=uses_type_ids, fusions=fusions or Fusions(),
        )
        self.attention = self.layout.name

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model's weights are held in."""
        return next(self.model.parameters()).dtype

    def weights(self) -> Weights:
        """Where the model came from, its weights' size and architecture."""
        return weights_of(self.model, self.name)

    def batch_tokens(self, longest: int, count: int, total: int) -> int:
        """Tokens a batch of `count` pairs takes in this attention layout (padding included where there is any)."""
        return self.layout.batch_tokens(longest, count, total)

    @torch.inference_mode()
    def run_batch(self, pairs: Sequence[EncodedPair]) -> tuple[torch.Tensor, int, int]:
        """Forward one planned batch: fp32 logits left on the device, tokens it took, passes run (a batch out of memory is split in two, recursively)."""
        pairs = list(pairs)
        lengths = [len(p.input_ids) for p in pairs]
        try:
            return self.forward_batch(pairs), self.layout.batch_tokens(max(lengths), len(pairs), sum(lengths)), 1
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_out_of_memory(e) or len(pairs) == 1:
                raise
            log.warning("out of memory on a batch of %d pairs; splitting it in two", len(pairs))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(pairs) // 2
            first = self.run_batch(pairs[:half])
            second = self.run_batch(pairs[half:])
            return torch.cat([first[0], second[0]]), first[1] + second[1], first[2] + second[2]

    def forward_batch(self, pairs: list[EncodedPair]) -> torch.Tensor:
        """One forward pass of `pairs` in the layout, no splitting."""
        return self.layout(pairs)

    @torch.inference_mode()
    def warm_shapes(self) -> None:
        """Run full batches of the layout's warm-up shapes (for padded attention with rounded widths, every width) and wait for them."""
        filler = self.pad_id + 1
        for rows, width in self.layout.warm_shapes(self.max_length, self.max_batch_tokens):
            self.run_batch([EncodedPair(array("i", [filler]) * width, array("i", bytes(4 * width)))] * rows)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def device_memory(device: torch.device) -> dict[str, Any]:
    """What PyTorch holds on a GPU (`gpu_allocated_bytes`, `gpu_reserved_bytes`, `gpu_max_allocated_bytes`, `gpu_name`); empty elsewhere.

    Host-side counters of the caching allocator: reading them waits for nothing on the device.
    """
    if device.type != "cuda":
        return {}
    return {
        "gpu_allocated_bytes": torch.cuda.memory_allocated(device),
        "gpu_reserved_bytes": torch.cuda.memory_reserved(device),
        "gpu_max_allocated_bytes": torch.cuda.max_memory_allocated(device),
        "gpu_name": torch.cuda.get_device_name(device),
    }


def is_out_of_memory(error: BaseException) -> bool:
    """True for the errors a device raises when a batch does not fit in its memory."""
    message = str(error)
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in message or "can't allocate memory" in message
