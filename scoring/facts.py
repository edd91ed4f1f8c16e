"""What a loaded scorer is: one frozen object, made once when the model loads, read by ranking, reports and host processes."""

from __future__ import annotations

import msgspec


class Architecture(msgspec.Struct, frozen=True, kw_only=True):
    """The network's shape, as its config and modules tell it."""

    model_type: str
    architectures: tuple[str, ...] = ()
    parameters: int = 0
    trainable_parameters: int = 0
    layers: int | None = None
    hidden_size: int | None = None
    attention_heads: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    modules: tuple[str, ...] = ()


class Weights(msgspec.Struct, frozen=True, kw_only=True):
    """Where the weights came from, how many bytes they hold, and the network they make."""

    path: str
    bytes: int
    architecture: Architecture


class ModelFacts(msgspec.Struct, frozen=True, kw_only=True):
    """A loaded model as it serves: name and revision, where and how it computes, and which process holds it."""

    name: str
    revision: str | None
    """The hub commit its files come from, else the pinned revision; None for a plain local directory."""
    device: str
    dtype: str
    """`float32`, `float16` or `bfloat16`."""
    attention: str
    """`packed` or `padded`: how a batch's tokens are laid out."""
    max_length: int
    max_batch_tokens: int
    pid: int
    """The process that holds the weights: this one, or a host process's device process."""
    weights: Weights
