"""How a batch's pairs are laid out for the model: `padded` (Hugging Face forward) or `packed` (scoring/packed.py)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import torch

from contract.errors import ModelLoadError
from scoring.packed import (
    Fusions,
    PackedForward,
    flash_varlen_usable,
    unsupported_reason,
)
from scoring.tokens import EncodedPair, joined

log = logging.getLogger(__name__)


class Forward(Protocol):
    """One way of laying a batch out for the model (an attention setting), chosen once at load."""

    name: str

    def batch_tokens(self, longest: int, count: int, total: int) -> int:
        """Tokens a batch of `count` pairs takes, given its longest pair and its total of real tokens."""

    def warm_shapes(self, max_length: int, max_batch_tokens: int) -> list[tuple[int, int]]:
        """(pairs, tokens per pair) of the batches to run at load on CUDA."""

    def __call__(self, pairs: Sequence[EncodedPair]) -> torch.Tensor:
        """Logits of `pairs` in order, fp32, left on the device."""


class PaddedForward:
    """The `padded` attention setting: a batch padded to its longest pair through the Hugging Face model."""

    name = "padded"

    def __init__(
        self, model: torch.nn.Module, *, device: torch.device, pad_id: int, pad_multiple: int, max_length: int, uses_type_ids: bool
    ) -> None:
        """Run `model` (already on `device`) on padded batches whose widths round up to `pad_multiple`."""
        self.model = model
        self.device = device
        self.pad_id = pad_id
        self.pad_multiple = pad_multiple
        self.max_length = max_length
        self.uses_type_ids = uses_type_ids

    def width(self, longest: int) -> int:
        """Padded width of a batch whose longest pair has `longest` tokens."""
        rounded = -(-longest // self.pad_multiple) * self.pad_multiple
        return max(longest, min(rounded, self.max_length))

    def batch_tokens(self, longest: int, count: int, total: int) -> int:
        """Tokens a batch takes: every pair padded to the batch's width."""
        return count * self.width(longest)

    def warm_shapes(self, max_length: int, max_batch_tokens: int) -> list[tuple[int, int]]:
        """One full batch at every rounded width a request can use; none when widths are not rounded."""
        if self.pad_multiple == 1:
            return []
        widths = sorted({self.width(n) for n in range(1, max_length + 1)})
        return [(max(1, max_batch_tokens // width), width) for width in widths]

    def __call__(self, pairs: Sequence[EncodedPair]) -> torch.Tensor:
        """Logits of `pairs` in order, fp32, left on the device."""
        width = self.width(max(len(p.input_ids) for p in pairs))
        lengths = torch.tensor([len(p.input_ids) for p in pairs])
        real = torch.arange(width) < lengths[:, None]
        # Ids, mask and type ids in one (pinned on CUDA) buffer: one asynchronous copy to the device.
        host = torch.zeros((2 + self.uses_type_ids, len(pairs), width), dtype=torch.long, pin_memory=self.device.type == "cuda")
        host[0].fill_(self.pad_id)
        host[0][real] = torch.frombuffer(joined(pairs), dtype=torch.int32).long()
        host[1] = real
        if self.uses_type_ids:
            host[2][real] = torch.frombuffer(joined(pairs, types=True), dtype=torch.int32).long()
        on_device = host.to(self.device, non_blocking=True)
        inputs = {"input_ids": on_device[0], "attention_mask": on_device[1]}
        if self.uses_type_ids:
            inputs["token_type_ids"] = on_device[2]
        # Upcast before anything else: a half-precision logit saturates the sigmoid into ties.
        # (transformers' SDPA mask check, `padding_mask.all()`, waits for the GPU once per padded
        # batch; packed attention has no such wait.)
        return self.model(**inputs).logits[:, 0].float()


def resolve_attention(requested: str | None, model: torch.nn.Module, device: torch.device) -> str:
    """The attention setting to use when unset: `packed` where it is faster, else `padded`.

    Packed is faster on CUDA with variable-length FlashAttention and on a CPU (no padding to
    compute; docs/benchmarks.md), but not on a GPU without that kernel, where its reference
    attention runs pair by pair. A model the packed encoder cannot run is served padded.
    """
    if requested is not None:
        return requested
    config = model.config
    flash = flash_varlen_usable(device, next(model.parameters()).dtype, config.hidden_size // config.num_attention_heads)
    wanted = flash or device.type == "cpu"
    reason = unsupported_reason(model)
    if wanted and reason is not None:
        log.warning("packed attention cannot run this model (%s); using padded attention", reason)
    return "packed" if wanted and reason is None else "padded"


def choose_layout(
    attention: str, model: torch.nn.Module, *, name: str, device: torch.device, pad_id: int, pad_multiple: int,
    max_length: int, uses_type_ids: bool, fusions: Fusions,
) -> Forward:
    """The layout object of an attention setting; refuse a setting the model cannot run."""
    if attention == "padded":
        return PaddedForward(model, device=device, pad_id=pad_id, pad_multiple=pad_multiple, max_length=max_length, uses_type_ids=uses_type_ids)
    if attention != "packed":
        raise ModelLoadError(f"unknown attention {attention!r}; set RERANK_ATTENTION to packed or padded")
    reason = unsupported_reason(model)
    if reason is not None:
        raise ModelLoadError(f"RERANK_ATTENTION=packed cannot run {name}: {reason}; set RERANK_ATTENTION=padded")
    return PackedForward(model, device=device, uses_type_ids=uses_type_ids, fusions=fusions)
