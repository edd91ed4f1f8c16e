"""Packed forward: a batch's pairs as one unpadded token stream through an inference-only encoder.

The encoder runs the weights of a loaded Hugging Face cross-encoder (XLM-RoBERTa, RoBERTa or
BERT, one logit) over a `[tokens, hidden]` stream with `cu_seqlens`, so no token is padding.
Attention is PyTorch's variable-length FlashAttention (`torch.nn.attention.varlen.varlen_attn`)
where it can run (CUDA sm80+, fp16/bf16), and a per-pair SDPA reference elsewhere: that is what
CI compares with the padded Hugging Face forward on a CPU.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from scoring.tokens import joined

if TYPE_CHECKING:
    from scoring.tokens import EncodedPair

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("xlm-roberta", "roberta", "bert")
# RoBERTa-style models number positions from padding_idx + 1; BERT from 0.
_ROBERTA_LIKE = {"xlm-roberta", "roberta"}
# What `torch.nn.attention.varlen.varlen_attn` (FlashAttention-2) accepts.
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class Fusions:
    """Which fusions the packed encoder applies; on by default only what measured faster (README, Benchmarks).

    `qkv`: Q, K and V as one GEMM (weights concatenated at load). `prune_last_layer`: after the
    last layer's attention, only each pair's first token goes on (the head reads nothing else).
    `gelu_epilogue`: bias + GELU in the GEMM (`torch._addmm_activation`; on CUDA that is
    cuBLASLt's epilogue, whose GELU is the tanh approximation). `compile_add_norm` and
    `compile_bias_gelu`: `torch.compile` of `LayerNorm(dense(x) + residual)` and
    `gelu(dense(x))`, so that each pointwise tail is one kernel. `cuda_graphs`: each batch padded
    up to a size class and run as one replay of a CUDA graph captured for that class (`Graphed`),
    instead of ~15 kernel launches per layer from Python; not measured on a GPU yet, so off.
    """

    qkv: bool = False
    prune_last_layer: bool = True
    gelu_epilogue: bool = False
    compile_add_norm: bool = False
    compile_bias_gelu: bool = False
    cuda_graphs: bool = False


@dataclass(frozen=True)
class Segments:
    """Where each pair's rows lie in a packed tensor: `cu` on the device (int32), `bounds` on the host."""

    cu: torch.Tensor
    bounds: list[int]
    longest: int


@dataclass(frozen=True)
class PackedBatch:
    """A batch's pairs as one token stream on the device."""

    input_ids: torch.Tensor
    type_ids: torch.Tensor | None
    position_ids: torch.Tensor
    pairs: Segments
    firsts: Segments


Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Segments, Segments], torch.Tensor]


def flash_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, queries: Segments, keys: Segments) -> torch.Tensor:
    """Variable-length FlashAttention over `(tokens, heads, head_dim)` tensors."""
    from torch.nn.attention.varlen import varlen_attn

    # Keyword arguments changed between PyTorch releases: pass only the seven positional ones.
    return varlen_attn(q, k, v, queries.cu, keys.cu, queries.longest, keys.longest)


def sdpa_per_pair_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, queries: Segments, keys: Segments) -> torch.Tensor:
    """Reference attention for any device and dtype: one SDPA call per pair, no mask needed."""
    out = torch.empty_like(q)
    # (1, heads, tokens, head_dim): SDPA's fused CPU kernel takes only 4-D inputs, 3-D ones get the slow math path.
    heads_first = lambda x, start, end: x[start:end].transpose(0, 1).unsqueeze(0)  # noqa: E731
    for (qs, qe), (ks, ke) in zip(itertools.pairwise(queries.bounds), itertools.pairwise(keys.bounds)):
        out[qs:qe] = F.scaled_dot_product_attention(heads_first(q, qs, qe), heads_first(k, ks, ke), heads_first(v, ks, ke))[0].transpose(0, 1)
    return out


def flash_varlen_usable(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """True where PyTorch's variable-length FlashAttention can run: importable, CUDA sm80+, fp16/bf16, head_dim ≤ 256."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return (
        device.type == "cuda"
        and torch.cuda.get_device_capability(device) >= (8, 0)
        and dtype in _FLASH_DTYPES
        and head_dim <= _FLASH_MAX_HEAD_DIM
    )


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the packed encoder cannot run `model`, or None when it can."""
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {config.model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type {config.position_embedding_type!r} is not 'absolute'"
    if config.hidden_act != "gelu":
        return f"hidden_act {config.hidden_act!r} is not 'gelu'"
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "it is configured as a decoder"
    if config.model_type == "bert" and getattr(model.base_model, "pooler", None) is None:
        return "its BERT model has no pooler for the classification head"
    if config.model_type != "bert" and not hasattr(getattr(model, "classifier", None), "out_proj"):
        return "its classification head is not RoBERTa's (dense, tanh, out_proj)"
    return None


@dataclass
class _Layer:
    qkv: tuple[torch.Tensor, torch.Tensor] | None
    q: tuple[torch.Tensor, torch.Tensor]
    k: tuple[torch.Tensor, torch.Tensor]
    v: tuple[torch.Tensor, torch.Tensor]
    kv: tuple[torch.Tensor, torch.Tensor] | None
    out: tuple[torch.Tensor, torch.Tensor]
    out_norm: tuple[torch.Tensor, torch.Tensor, float]
    ffn_in: tuple[torch.Tensor, torch.Tensor]
    ffn_out: tuple[torch.Tensor, torch.Tensor]
    ffn_norm: tuple[torch.Tensor, torch.Tensor, float]


def _linear(module: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    return module.weight, module.bias


def _norm(module: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor, float]:
    return module.weight, module.bias, module.eps


@torch.no_grad()
def _fuse_qkv(attention: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate Q, K, V weights into one matrix and rebind the HF linears to views of it.

    The rebinding keeps the weights in memory once; it must happen after the model is on its device.
    """
    linears = (attention.query, attention.key, attention.value)
    weight = torch.cat([lin.weight for lin in linears])
    bias = torch.cat([lin.bias for lin in linears])
    rows = linears[0].weight.shape[0]
    for i, lin in enumerate(linears):
        lin.weight = torch.nn.Parameter(weight[i * rows : (i + 1) * rows], requires_grad=False)
        lin.bias = torch.nn.Parameter(bias[i * rows : (i + 1) * rows], requires_grad=False)
    return weight, bias


def _add_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor,
              norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(F.linear(x, weight, bias) + residual, (residual.shape[-1],), norm_weight, norm_bias, eps)


def _bias_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.gelu(F.linear(x, weight, bias))


def _bias_gelu_epilogue(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)


class PackedEncoder:
    """An inference-only encoder over packed tokens that runs a loaded HF cross-encoder's own weights."""

    def __init__(self, model: torch.nn.Module, attention: Attention, fusions: Fusions = Fusions()) -> None:
        """Read the weights of `model` (already on its device); refuse an architecture it cannot run."""
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the packed encoder cannot run this model: {reason}")
        config = model.config
        base = model.base_model
        embeddings = base.embeddings
        self.fusions = fusions
        self.attention = attention
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.hidden = config.hidden_size
        self.word = embeddings.word_embeddings.weight
        self.token_type = embeddings.token_type_embeddings.weight
        self.position = embeddings.position_embeddings.weight
        self.position_offset = config.pad_token_id + 1 if config.model_type in _ROBERTA_LIKE else 0
        self.embedding_norm = _norm(embeddings.LayerNorm)
        self.layers = [self._layer(layer, fusions.qkv) for layer in base.encoder.layer]
        if config.model_type == "bert":
            self.pooler, self.classifier = _linear(base.pooler.dense), _linear(model.classifier)
        else:
            self.pooler, self.classifier = _linear(model.classifier.dense), _linear(model.classifier.out_proj)
        self._add_norm = torch.compile(_add_norm, dynamic=True) if fusions.compile_add_norm else _add_norm
        bias_gelu = _bias_gelu_epilogue if fusions.gelu_epilogue else _bias_gelu
        self._bias_gelu = torch.compile(bias_gelu, dynamic=True) if fusions.compile_bias_gelu else bias_gelu

    @staticmethod
    def _layer(layer: torch.nn.Module, fuse_qkv: bool) -> _Layer:
        attention = layer.attention.self
        qkv = _fuse_qkv(attention) if fuse_qkv else None
        q, k, v = _linear(attention.query), _linear(attention.key), _linear(attention.value)
        rows = q[0].shape[0]
        # K and V of the fused matrix are one contiguous block: the pruned last layer multiplies by it once.
        kv = (qkv[0][rows:], qkv[1][rows:]) if qkv is not None else None
        return _Layer(
            qkv=qkv, q=q, k=k, v=v, kv=kv,
            out=_linear(layer.attention.output.dense), out_norm=_norm(layer.attention.output.LayerNorm),
            ffn_in=_linear(layer.intermediate.dense),
            ffn_out=_linear(layer.output.dense), ffn_norm=_norm(layer.output.LayerNorm),
        )

    def __call__(self, batch: PackedBatch) -> torch.Tensor:
        """Return each pair's logit (fp32, on the device) for a packed batch."""
        x = F.embedding(batch.input_ids, self.word)
        x = x + (self.token_type[0] if batch.type_ids is None else F.embedding(batch.type_ids, self.token_type))
        x = x + F.embedding(batch.position_ids, self.position)
        x = F.layer_norm(x, (self.hidden,), *self.embedding_norm)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = self._run_layer(x, layer, batch, pruned=self.fusions.prune_last_layer and i == last)
        if not self.fusions.prune_last_layer:
            x = x.index_select(0, batch.pairs.cu[:-1])
        pooled = torch.tanh(F.linear(x, *self.pooler))
        # Upcast before anything else: a half-precision logit saturates the sigmoid into ties.
        return F.linear(pooled, *self.classifier)[:, 0].float()

    def _run_layer(self, x: torch.Tensor, layer: _Layer, batch: PackedBatch, pruned: bool) -> torch.Tensor:
        tokens = x.shape[0]
        shape = (-1, self.heads, self.head_dim)
        if pruned:
            # The head reads only each pair's first token: it alone needs a query and what follows.
            residual = x.index_select(0, batch.pairs.cu[:-1])
            q = F.linear(residual, *layer.q).view(shape)
            if layer.kv is not None:
                k, v = F.linear(x, *layer.kv).view(tokens, 2, self.heads, self.head_dim).unbind(1)
            else:
                k, v = F.linear(x, *layer.k).view(shape), F.linear(x, *layer.v).view(shape)
            queries = batch.firsts
        else:
            residual = x
            if layer.qkv is not None:
                q, k, v = F.linear(x, *layer.qkv).view(tokens, 3, self.heads, self.head_dim).unbind(1)
            else:
                q, k, v = (F.linear(x, *w).view(shape) for w in (layer.q, layer.k, layer.v))
            queries = batch.pairs
        context = self.attention(q, k, v, queries, batch.pairs).reshape(-1, self.hidden)
        x = self._add_norm(context, *layer.out, residual, *layer.out_norm)
        return self._add_norm(self._bias_gelu(x, *layer.ffn_in), *layer.ffn_out, x, *layer.ffn_norm)


def pack(pairs: Sequence[EncodedPair], device: torch.device, position_offset: int, with_type_ids: bool) -> PackedBatch:
    """Lay `pairs` out as one token stream and send it to `device` in one (pinned, asynchronous) copy."""
    host, layout = pack_host(pairs, position_offset, with_type_ids, pin=device.type == "cuda")
    return layout.on(host.to(device, non_blocking=True))


@dataclass(frozen=True)
class PackLayout:
    """Where a packed batch's fields lie in its one int32 buffer."""

    tokens: int
    pairs: int
    with_type_ids: bool
    bounds: list[int]
    longest: int

    def on(self, buffer: torch.Tensor) -> PackedBatch:
        """The batch as views of `buffer` (on its device)."""
        tokens, n, fields = self.tokens, self.pairs, 2 + self.with_type_ids
        cu = buffer[fields * tokens : fields * tokens + n + 1]
        return PackedBatch(
            input_ids=buffer[:tokens],
            type_ids=buffer[tokens : 2 * tokens] if self.with_type_ids else None,
            position_ids=buffer[(fields - 1) * tokens : fields * tokens],
            pairs=Segments(cu, self.bounds, self.longest),
            firsts=Segments(buffer[fields * tokens + n + 1 :], list(range(n + 1)), 1),
        )


def pack_host(
    pairs: Sequence[EncodedPair], position_offset: int, with_type_ids: bool, *, pin: bool = False,
    size: tuple[int, int] | None = None, filler_id: int = 0, max_position: int | None = None,
) -> tuple[torch.Tensor, PackLayout]:
    """`pairs` as one int32 host buffer: ids, [type ids], position ids, then cu_seqlens of the pairs and of their first tokens.

    With `size` = (tokens, pairs) the batch is padded up to it with filler pairs of `filler_id`
    after the real ones: one token each, the last taking the remaining tokens (no pair is empty,
    which variable-length attention may not accept), positions held below `max_position`; the
    real pairs' logits are those of the unpadded batch.
    """
    lengths = [len(p.input_ids) for p in pairs]
    real_tokens = sum(lengths)
    if size is not None:
        tokens_class, pairs_class = size
        fillers = pairs_class - len(pairs)
        if fillers < 1 or tokens_class < real_tokens + fillers:
            raise ValueError(f"a size class ({size}) must leave room for filler pairs beside the batch ({real_tokens} tokens, {len(pairs)} pairs)")
        lengths = lengths + [1] * (fillers - 1) + [tokens_class - real_tokens - (fillers - 1)]
    tokens, n = sum(lengths), len(lengths)
    bounds = [0, *itertools.accumulate(lengths)]
    fields = 2 + with_type_ids
    host = torch.zeros(fields * tokens + 2 * (n + 1), dtype=torch.int32, pin_memory=pin)
    host[:real_tokens] = torch.frombuffer(joined(pairs), dtype=torch.int32)
    host[real_tokens:tokens] = filler_id
    if with_type_ids:
        host[tokens : tokens + real_tokens] = torch.frombuffer(joined(pairs, types=True), dtype=torch.int32)
    starts = torch.tensor(bounds, dtype=torch.int32)
    positions = host[(fields - 1) * tokens : fields * tokens]
    torch.arange(position_offset, tokens + position_offset, dtype=torch.int32, out=positions)
    positions -= torch.repeat_interleave(starts[:-1], torch.tensor(lengths), output_size=tokens)
    if max_position is not None:
        positions.clamp_(max=max_position - 1)
    host[fields * tokens : fields * tokens + n + 1] = starts
    torch.arange(n + 1, dtype=torch.int32, out=host[fields * tokens + n + 1 :])
    return host, PackLayout(tokens, n, with_type_ids, bounds, max(lengths))


def size_class(tokens: int, pairs: int, step: int) -> tuple[int, int]:
    """The (tokens, pairs) a batch is padded up to for a graph: pairs to the next power of two, tokens (with a token per filler pair) up to a multiple of `step`."""
    pairs_class = 1 << pairs.bit_length()
    return -(-(tokens + pairs_class - pairs) // step) * step, pairs_class


class Graphed:
    """Runs the packed encoder as one CUDA graph replay per batch: one graph per size class, captured on first use.

    A batch is padded up to its class (`size_class`, `pack_host`) and copied into that class's
    static input buffer, the graph is replayed, and the real pairs' logits are copied out of its
    static output. `max_seqlen` of the attention is the class's constant (the larger of the
    longest pair a request may have and the token step), since a graph keeps the one it was
    captured with. Graphs share one memory pool.
    """

    def __init__(self, encoder: PackedEncoder, device: torch.device, *, with_type_ids: bool, max_length: int,
                 max_position: int, filler_id: int, step: int = 2048) -> None:
        """Replay `encoder` on `device` for batches of pairs of at most `max_length` tokens."""
        self.encoder = encoder
        self.device = device
        self.with_type_ids = with_type_ids
        self.longest = max(max_length, step)
        self.max_position = max_position
        self.filler_id = filler_id
        self.step = step
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, pairs: Sequence[EncodedPair]) -> torch.Tensor:
        """Logits of `pairs` in order, fp32, on the device."""
        size = size_class(sum(len(p.input_ids) for p in pairs), len(pairs), self.step)
        host, layout = pack_host(pairs, self.encoder.position_offset, self.with_type_ids, pin=True, size=size,
                                 filler_id=self.filler_id, max_position=self.max_position)
        if size not in self.graphs:
            self.graphs[size] = self._capture(host, layout)
        graph, inputs, logits = self.graphs[size]
        inputs.copy_(host, non_blocking=True)
        graph.replay()
        return logits[: len(pairs)].clone()

    def _capture(self, host: torch.Tensor, layout: PackLayout) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        inputs = host.to(self.device)
        batch = layout.on(inputs)
        batch = PackedBatch(batch.input_ids, batch.type_ids, batch.position_ids,
                            Segments(batch.pairs.cu, batch.pairs.bounds, self.longest), batch.firsts)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # a warm-up outside the graph, as capture requires
            self.encoder(batch)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.encoder(batch)
        log.info("captured a CUDA graph for batches of %d tokens and %d pairs", layout.tokens, layout.pairs)
        return graph, inputs, logits


class PackedForward:
    """The `packed` attention setting: each batch as one unpadded token stream through `PackedEncoder`."""

    name = "packed"

    def __init__(
        self, model: torch.nn.Module, *, device: torch.device, uses_type_ids: bool, fusions: Fusions = Fusions()
    ) -> None:
        """Build the encoder on `model`'s weights, with FlashAttention varlen where usable, else SDPA per pair."""
        dtype = next(model.parameters()).dtype
        head_dim = model.config.hidden_size // model.config.num_attention_heads
        flash = flash_varlen_usable(device, dtype, head_dim)
        if device.type == "cuda" and not flash:
            log.warning(
                "packed attention on %s without variable-length FlashAttention (needs PyTorch >= 2.10, sm80+, fp16/bf16): "
                "using per-pair SDPA, which is slow; set RERANK_ATTENTION=padded", device,
            )
        self.kernel = "flash_varlen" if flash else "sdpa_per_pair"
        self.device = device
        self.uses_type_ids = uses_type_ids
        self.encoder = PackedEncoder(model, flash_varlen_attention if flash else sdpa_per_pair_attention, fusions)
        self.graphed: Graphed | None = None
        if fusions.cuda_graphs:
            if not flash:
                raise ValueError("cuda_graphs needs variable-length FlashAttention on a CUDA device (sm80+, fp16/bf16)")
            config = model.config
            self.graphed = Graphed(
                self.encoder, device, with_type_ids=uses_type_ids, max_length=config.max_position_embeddings - self.encoder.position_offset,
                max_position=config.max_position_embeddings, filler_id=config.pad_token_id or 0,
            )

    def batch_tokens(self, longest: int, count: int, total: int) -> int:
        """Tokens a batch takes: exactly its tokens, since nothing is padded."""
        return total

    def warm_shapes(self, max_length: int, max_batch_tokens: int) -> list[tuple[int, int]]:
        """Batches to run at load on CUDA: one full budget of longest pairs, to size the memory pool."""
        return [(max(1, max_batch_tokens // max_length), max_length)]

    def __call__(self, pairs: Sequence[EncodedPair]) -> torch.Tensor:
        """Logits of `pairs` in order, fp32, left on the device."""
        if self.graphed is not None:
            return self.graphed(pairs)
        return self.encoder(pack(pairs, self.device, self.encoder.position_offset, self.uses_type_ids))
