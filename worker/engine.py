"""The scoring engine: tokenize, forward, postprocess. Knows nothing of Celery."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from producer.errors import ModelLoadError
from worker.packed import Fusions, PackedForward, flash_varlen_usable, unsupported_reason

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Tokens per forward pass: small batches stay in a CPU's caches, GPUs need large ones to fill
# their cores (measured in benchmarks/sweep.py; README, Benchmarks).
DEFAULT_BATCH_TOKENS = {"cpu": 2048, "cuda": 32768}
# Batch widths (padded attention) round up to a multiple of this: a GPU is slow the first time it
# meets a shape, so CUDA workers see few and warm them all at load (benchmarks/fresh_shapes.py).
DEFAULT_PAD_MULTIPLE = {"cpu": 1, "cuda": 64}
# Passages per tokenized slice: later slices are tokenized on a thread while earlier ones run, so
# a GPU's first forward waits for one slice's tokens, not the request's; 0 tokenizes up front,
# as a CPU should, where tokenizing shares the cores it would hide behind.
DEFAULT_TOKENIZE_SLICE = {"cpu": 0, "cuda": 32}
# Characters read per token a pair still needs; tokenizers average 3-6 characters per token on
# prose, and a cut that yields too few tokens is widened (CrossEncoderEngine._passage_ids).
CHARS_PER_TOKEN = 8
# RoBERTa-style position ids start after the padding index, so 514 positions hold 512 tokens.
_POSITION_OFFSET = {"xlm-roberta": 2, "roberta": 2, "camembert": 2}


@dataclass(frozen=True)
class EncodedPair:
    """Token ids (and type ids) of one query+passage pair, specials included."""

    input_ids: list[int]
    type_ids: list[int]


@dataclass(frozen=True)
class Scores:
    """Logits in input order, plus what it cost to compute them."""

    logits: list[float]
    tokens: int
    padded_tokens: int
    batches: int
    tokenize_seconds: float
    forward_seconds: float
    oom_splits: int = 0

    @property
    def probabilities(self) -> list[float]:
        """Sigmoid of each fp32 logit."""
        return torch.sigmoid(torch.tensor(self.logits, dtype=torch.float32)).tolist()


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """Map a dtype setting to a torch dtype; `auto` is fp16 on CUDA and fp32 on CPU."""
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return DTYPES[dtype]


def usable_length(config: AutoConfig, tokenizer: PreTrainedTokenizerBase) -> int:
    """The most tokens one pair may have for this model (e.g. 512 for 514 positions)."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return tokenizer.model_max_length
    return positions - _POSITION_OFFSET.get(config.model_type, 0)


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
        host[0][real] = torch.tensor(list(itertools.chain.from_iterable(p.input_ids for p in pairs)))
        host[1] = real
        if self.uses_type_ids:
            host[2][real] = torch.tensor(list(itertools.chain.from_iterable(p.type_ids for p in pairs)))
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
    compute; README, Benchmarks), but not on a GPU without that kernel, where its reference
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


@dataclass(frozen=True)
class PairTemplate:
    """Where the tokenizer's post-processor puts special tokens and type ids around a query and a passage."""

    prefix: list[int]
    prefix_types: list[int]
    query_type: int
    middle: list[int]
    middle_types: list[int]
    passage_type: int
    suffix: list[int]
    suffix_types: list[int]

    @classmethod
    def of(cls, backend: Tokenizer) -> PairTemplate:
        """Read the template off one post-processed probe pair; refuse a post-processor that is not one."""
        query = backend.encode("query", add_special_tokens=False)
        passage = backend.encode("passage", add_special_tokens=False)
        pair = backend.post_process(query, passage, add_special_tokens=True)
        ids, types = pair.ids, pair.type_ids
        q_at = _find(ids, query.ids, 0)
        p_at = _find(ids, passage.ids, q_at + len(query.ids)) if q_at >= 0 else -1
        q = range(q_at, q_at + len(query.ids))
        p = range(p_at, p_at + len(passage.ids))
        if not (query.ids and passage.ids and q_at >= 0 and p_at >= 0
                and len({types[i] for i in q}) == 1 and len({types[i] for i in p}) == 1):
            raise ModelLoadError(
                "the tokenizer's post-processor does not lay a pair out as specials, query, specials, passage, specials "
                "(one type id per sequence); use a model whose tokenizer.json has a BERT/RoBERTa-style pair template"
            )
        return cls(
            prefix=ids[: q[0]], prefix_types=types[: q[0]], query_type=types[q[0]],
            middle=ids[q[-1] + 1 : p[0]], middle_types=types[q[-1] + 1 : p[0]], passage_type=types[p[0]],
            suffix=ids[p[-1] + 1 :], suffix_types=types[p[-1] + 1 :],
        )

    @property
    def specials(self) -> int:
        """Special tokens the template adds to a pair."""
        return len(self.prefix) + len(self.middle) + len(self.suffix)


def _head(text: str, chars: int) -> str:
    """The first `chars` characters of `text`, ending before a whitespace when one is in the second half, so no word is cut."""
    if len(text) <= chars:
        return text
    head = text[:chars]
    space = max(head.rfind(" "), head.rfind("\n"), head.rfind("\t"))
    return head[:space] if space > chars // 2 else head


def _find(haystack: list[int], needle: list[int], start: int) -> int:
    """Index of the first occurrence of `needle` in `haystack` from `start`, or -1."""
    for i in range(start, len(haystack) - len(needle) + 1):
        if haystack[i : i + len(needle)] == needle:
            return i
    return -1


class CrossEncoderEngine:
    """Scores query-passage pairs with a single-logit sequence-classification model."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str,
        device: str = "cpu",
        max_length: int = 512,
        max_batch_tokens: int | None = None,
        pad_multiple: int | None = None,
        attention: Literal["packed", "padded"] = "padded",
        fusions: Fusions | None = None,
        tokenize_slice: int | None = None,
    ) -> None:
        """Wrap a loaded model (already on `device`) and tokenizer; prefer `CrossEncoderEngine.load`."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ModelLoadError(f"{name}: a fast (Rust) tokenizer is required; ship tokenizer.json with the model")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device)
        self.max_length = max_length
        self.max_batch_tokens = max_batch_tokens or DEFAULT_BATCH_TOKENS[self.device.type]
        self.pad_multiple = pad_multiple or DEFAULT_PAD_MULTIPLE[self.device.type]
        self.tokenize_slice = DEFAULT_TOKENIZE_SLICE[self.device.type] if tokenize_slice is None else tokenize_slice
        self._backend = backend
        # encode_batch_fast skips character offsets, which scoring never reads (tokenizers >= 0.21).
        self._encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        self._template = PairTemplate.of(backend)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._query_cap = max_length * 3 // 4
        self._uses_type_ids = "token_type_ids" in tokenizer.model_input_names
        self._layout = self._choose_layout(attention, fusions or Fusions())
        self.attention = self._layout.name
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0

    def _choose_layout(self, attention: str, fusions: Fusions) -> Forward:
        if attention == "padded":
            return PaddedForward(
                self.model, device=self.device, pad_id=self._pad_id, pad_multiple=self.pad_multiple,
                max_length=self.max_length, uses_type_ids=self._uses_type_ids,
            )
        if attention != "packed":
            raise ModelLoadError(f"unknown attention {attention!r}; set RERANK_ATTENTION to packed or padded")
        reason = unsupported_reason(self.model)
        if reason is not None:
            raise ModelLoadError(f"RERANK_ATTENTION=packed cannot run {self.name}: {reason}; set RERANK_ATTENTION=padded")
        return PackedForward(self.model, device=self.device, uses_type_ids=self._uses_type_ids, fusions=fusions)

    @classmethod
    def load(
        cls,
        name_or_path: str,
        *,
        revision: str | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        max_length: int = 512,
        max_batch_tokens: int | None = None,
        pad_multiple: int | None = None,
        attention: Literal["packed", "padded"] | None = None,
        fusions: Fusions | None = None,
        tokenize_slice: int | None = None,
    ) -> CrossEncoderEngine:
        """Load a cross-encoder from a hub id or a local directory, ready to score.

        `attention` unset is `packed` where variable-length FlashAttention can run the model
        (CUDA), else `padded`.
        """
        torch_dtype = resolve_dtype(dtype, device)
        if torch_dtype == torch.bfloat16 and device == "cpu" and not cpu_has_native_bf16():
            log.warning("bf16 requested on a CPU without AVX512-BF16 or AMX: expect it to be several times slower than fp32")
        _, tokenizer = check_model(name_or_path, revision, max_length)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, revision=revision, dtype=torch_dtype, attn_implementation="sdpa"
            )
            model.to(device)
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"cannot load model weights of {name_or_path!r} onto {device}: {e}") from e
        engine = cls(
            model, tokenizer, name=name_or_path, device=device, max_length=max_length,
            max_batch_tokens=max_batch_tokens, pad_multiple=pad_multiple,
            attention=resolve_attention(attention, model, torch.device(device)), fusions=fusions, tokenize_slice=tokenize_slice,
        )
        engine.warmup()
        return engine

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model's weights are held in."""
        return next(self.model.parameters()).dtype

    def warmup(self) -> None:
        """Run passes at load so the first real request pays no lazy initialisation.

        On CUDA that includes full batches of the layout's warm-up shapes (for padded attention
        with rounded widths, every width a request can use); an out-of-memory batch is split, as in scoring.
        """
        self.score("warm-up query", ["warm-up passage"])
        if self.device.type == "cuda":
            self._warm_widths()
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _warm_widths(self) -> None:
        filler = self._pad_id + 1
        for rows, width in self._layout.warm_shapes(self.max_length, self.max_batch_tokens):
            self.run_batch([EncodedPair([filler] * width, [0] * width)] * rows)

    def tokenize(self, query: str, passages: Sequence[str]) -> list[EncodedPair]:
        """Encode pairs, capping the query at 3/4 of max_length and truncating only passages."""
        template = self._template
        query_ids = self._backend.encode(query, add_special_tokens=False).ids[: self._query_cap]
        budget = self.max_length - len(query_ids) - template.specials
        # The pair is assembled from the template's lists rather than by `post_process`, which
        # holds the GIL for ~0.3 ms a pair (35 ms per 100 docs here) that tokenizing ahead must not.
        head = template.prefix + query_ids + template.middle
        head_types = template.prefix_types + [template.query_type] * len(query_ids) + template.middle_types
        pairs = []
        for ids in self._passage_ids(passages, budget):
            ids = ids[:budget]
            pairs.append(EncodedPair(head + ids + template.suffix, head_types + [template.passage_type] * len(ids) + template.suffix_types))
        return pairs

    def _passage_ids(self, passages: Sequence[str], budget: int) -> list[list[int]]:
        """Token ids of each passage's first `budget` tokens or more, without tokenizing text past them.

        Tokenizing runs in Rust, where a task's soft time limit cannot interrupt it, so a 100,000-
        character passage must not be tokenized whole to keep its first 500 tokens. Each passage
        is cut at a word boundary after CHARS_PER_TOKEN characters per needed token; the tokens
        before the cut are those of the whole text. A cut that yields too few tokens (long
        tokens, whitespace runs) is widened fourfold until it yields enough or covers the text.
        """
        chars = (budget + 1) * CHARS_PER_TOKEN
        heads = [_head(text, chars) for text in passages]
        ids = [encoded.ids for encoded in self._encode_batch(heads, add_special_tokens=False)]
        for n, text in enumerate(passages):
            wider = chars
            while len(ids[n]) < budget and len(heads[n]) < len(text):
                wider *= 4
                heads[n] = _head(text, wider)
                ids[n] = self._backend.encode(heads[n], add_special_tokens=False).ids
        return ids

    @torch.inference_mode()
    def forward(
        self, pairs: Sequence[EncodedPair], on_batch: Callable[[int, int], None] | None = None
    ) -> tuple[list[float], int, int]:
        """Return fp32 logits in input order, padded tokens used, and batches run.

        Identical pairs are scored once, so they get identical scores (a GEMM may round a row
        differently depending on its place in the batch). Pairs are sorted by length and packed
        into batches of at most `max_batch_tokens` tokens (padded tokens, with padded attention),
        so short passages are not padded to the longest one in the request. `on_batch(done,
        total)` is called after each planned batch (an out-of-memory split still counts as one).
        """
        scoring = _Scoring(self, len(pairs), on_batch)
        scoring.add(pairs)
        return scoring.finish()

    @torch.inference_mode()
    def score(
        self, query: str, passages: Sequence[str], on_batch: Callable[[int, int], None] | None = None
    ) -> Scores:
        """Tokenize and score `passages` against `query`; logits come back in input order.

        With `tokenize_slice`, passages are tokenized slice by slice on a thread while the
        previous slice's batches run; `tokenize_seconds` is the time scoring waited for tokens.
        """
        if not passages:
            return Scores([], 0, 0, 0, 0.0, 0.0)
        started = time.perf_counter()
        scoring = _Scoring(self, len(passages), on_batch)
        waited = 0.0
        # closing(): a failed batch cancels the slices not yet tokenized now, not when collected.
        with contextlib.closing(self._tokenized_slices(query, list(passages))) as slices:
            while True:
                asked = time.perf_counter()
                pairs = next(slices, None)
                waited += time.perf_counter() - asked
                if pairs is None:
                    break
                scoring.add(pairs)
        logits, padded, batches = scoring.finish()
        finished = time.perf_counter()
        return Scores(
            logits=logits,
            tokens=scoring.tokens,
            padded_tokens=padded,
            batches=batches,
            tokenize_seconds=waited,
            forward_seconds=finished - started - waited,
            oom_splits=scoring.batches - scoring.planned,
        )

    def _tokenized_slices(self, query: str, passages: list[str]) -> Iterator[list[EncodedPair]]:
        count = -(-len(passages) // self.tokenize_slice) if self.tokenize_slice else 1
        if count <= 1:
            yield self.tokenize(query, passages)
            return
        bounds = [round(i * len(passages) / count) for i in range(count + 1)]
        pool = self._tokenizer_pool()
        # The Rust tokenizer releases the GIL while it encodes, so the next slice is tokenized while
        # this thread launches (on CUDA, queues) the current slice's batches.
        futures = [pool.submit(self.tokenize, query, passages[a:b]) for a, b in itertools.pairwise(bounds)]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()

    def _tokenizer_pool(self) -> ThreadPoolExecutor:
        # A pool made before a fork has no thread in the child: make one per process.
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
            self._pool_pid = os.getpid()
        return self._pool

    def _batches(self, order: list[int], pairs: Sequence[EncodedPair]) -> list[list[int]]:
        batches: list[list[int]] = []
        total = 0
        for i in order:
            n = len(pairs[i].input_ids)
            # The first pair of a batch is its longest, since `order` is sorted by length.
            if batches and self.batch_tokens(len(pairs[batches[-1][0]].input_ids), len(batches[-1]) + 1, total + n) <= self.max_batch_tokens:
                batches[-1].append(i)
                total += n
            else:
                batches.append([i])
                total = n
        return batches

    def batch_tokens(self, longest: int, count: int, total: int) -> int:
        """Tokens a batch of `count` pairs takes in this attention layout (padding included where there is any)."""
        return self._layout.batch_tokens(longest, count, total)

    @torch.inference_mode()
    def run_batch(self, pairs: Sequence[EncodedPair]) -> tuple[torch.Tensor, int, int]:
        """Forward one planned batch: fp32 logits left on the device, tokens it took, passes run (a batch out of memory is split in two, recursively)."""
        pairs = list(pairs)
        lengths = [len(p.input_ids) for p in pairs]
        try:
            return self._forward_batch(pairs), self._layout.batch_tokens(max(lengths), len(pairs), sum(lengths)), 1
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _is_out_of_memory(e) or len(pairs) == 1:
                raise
            log.warning("out of memory on a batch of %d pairs; splitting it in two", len(pairs))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(pairs) // 2
            first = self.run_batch(pairs[:half])
            second = self.run_batch(pairs[half:])
            return torch.cat([first[0], second[0]]), first[1] + second[1], first[2] + second[2]

    def _forward_batch(self, pairs: list[EncodedPair]) -> torch.Tensor:
        return self._layout(pairs)


class UniquePairs:
    """A request's pairs with repeats kept once, and the logits of those once-pairs as their batches return them."""

    def __init__(self) -> None:
        """Start empty; `add` pairs, `collect` their logits, then read them back `in_input_order`."""
        self.unique: list[EncodedPair] = []
        self.owner: list[int] = []  # for each pair added, its index in `unique`
        self._first_of: dict[tuple[int, ...], int] = {}
        self._rows: list[int] = []  # indexes in `unique`, in the order their logits were collected
        self._logits: list[torch.Tensor] = []

    def add(self, pairs: Sequence[EncodedPair]) -> list[int]:
        """Take `pairs` after those added before; return the indexes of the new unique ones, longest first."""
        start = len(self.unique)
        for pair in pairs:
            index = self._first_of.setdefault(tuple(pair.input_ids), len(self.unique))
            if index == len(self.unique):
                self.unique.append(pair)
            self.owner.append(index)
        return sorted(range(start, len(self.unique)), key=lambda i: len(self.unique[i].input_ids), reverse=True)

    def collect(self, indexes: Sequence[int], logits: torch.Tensor) -> None:
        """Keep the logits of the unique pairs at `indexes` (one row each, on the device)."""
        self._rows.extend(indexes)
        self._logits.append(logits)

    def in_input_order(self) -> list[float]:
        """Fp32 logits of every pair added, in the order added (the request's one wait for the device)."""
        if not self.owner:
            return []
        by_unique = torch.empty(len(self.unique), dtype=torch.float32)
        by_unique[torch.tensor(self._rows)] = torch.cat(self._logits).cpu()
        return by_unique[torch.tensor(self.owner)].tolist()


class _Scoring:
    """One request in flight: identical pairs scored once, batches planned slice by slice, logits kept on the device."""

    def __init__(self, engine: CrossEncoderEngine, expected: int, on_batch: Callable[[int, int], None] | None) -> None:
        self.engine = engine
        self.expected = expected
        self.on_batch = on_batch
        self.pairs = UniquePairs()
        self.tokens = self.padded = self.batches = self.planned = self.done = 0

    def add(self, pairs: Sequence[EncodedPair]) -> None:
        """Score `pairs` (a slice of the request) after the slices added before."""
        order = self.pairs.add(pairs)
        self.tokens += sum(len(pair.input_ids) for pair in pairs)
        plan = self.engine._batches(order, self.pairs.unique)
        self.planned += len(plan)
        # Slices not tokenized yet are counted at this request's batches per pair so far.
        added = len(self.pairs.owner)
        remaining = self.expected - added
        total = self.planned + (-(-remaining * self.planned // added) if remaining > 0 and added else 0)
        for batch in plan:
            logits, padded, runs = self.engine.run_batch([self.pairs.unique[i] for i in batch])
            self.pairs.collect(batch, logits)
            self.padded += padded
            self.batches += runs
            self.done += 1
            # On CUDA this counts batches queued, not finished: waiting for the GPU here would
            # cost a synchronisation per batch.
            if self.on_batch is not None:
                self.on_batch(self.done, total)

    def finish(self) -> tuple[list[float], int, int]:
        """Fp32 logits in input order (the request's one wait for the device), padded tokens, batches run."""
        return self.pairs.in_input_order(), self.padded, self.batches


def check_model(name_or_path: str, revision: str | None = None, max_length: int | None = None) -> tuple[AutoConfig, PreTrainedTokenizerBase]:
    """Load the config and tokenizer and check, without loading weights or touching CUDA, that the model can serve.

    It must be a one-logit cross-encoder whose tokenizer belongs to it, whose local weights are
    whole, and which reads `max_length` tokens. Workers run this before their pool starts.
    """
    try:
        config = AutoConfig.from_pretrained(name_or_path, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot load {name_or_path!r}: {e}. Set RERANK_MODEL to a hub id this host can download, "
            "or to a local directory holding config.json, the weights and the tokenizer files"
        ) from e
    if getattr(config, "num_labels", None) != 1:
        raise ModelLoadError(
            f"{name_or_path!r} has {config.num_labels} output labels; a re-ranker needs exactly one "
            "relevance logit (a cross-encoder such as BAAI/bge-reranker-v2-m3)"
        )
    # Without its tokenizer files transformers builds a stand-in with a handful of tokens, which
    # turns every word into <unk>; a tokenizer with more tokens than the embedding has rows
    # produces ids the model cannot look up. Vocabularies are sometimes padded, never halved.
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and not vocab // 2 <= len(tokenizer) <= vocab:
        raise ModelLoadError(
            f"the tokenizer of {name_or_path!r} has {len(tokenizer)} tokens but the model's embedding has {vocab}: "
            "its tokenizer files are missing or belong to another model; put this model's tokenizer.json "
            "(and sentencepiece.bpe.model or vocab.txt) next to its config.json"
        )
    limit = usable_length(config, tokenizer)
    if max_length is not None and max_length > limit:
        raise ModelLoadError(
            f"RERANK_MAX_LENGTH={max_length} exceeds what {name_or_path} can read ({limit} tokens); "
            f"set RERANK_MAX_LENGTH to {limit} or less"
        )
    check_weights(name_or_path)
    return config, tokenizer


def check_weights(name_or_path: str) -> None:
    """In a local model directory, check that weights exist and that safetensors files are whole (headers only, no tensors read).

    A hub id is left to `from_pretrained`, which downloads and checks what it fetches.
    """
    directory = Path(name_or_path)
    if not directory.is_dir():
        return
    safetensors = sorted(directory.glob("*.safetensors"))
    if not safetensors and not any(directory.glob("pytorch_model*.bin")):
        raise ModelLoadError(
            f"no weights in {name_or_path!r}: expected model.safetensors (or its shards, or pytorch_model.bin) next to config.json"
        )
    for path in safetensors:
        try:
            with safe_open(str(path), "pt") as weights:
                weights.keys()
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"the weights file {path} cannot be read ({e}); download it again") from e


def cpu_has_native_bf16() -> bool:
    """True when the CPU reports AVX512-BF16 or AMX-BF16 (Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def _is_out_of_memory(error: BaseException) -> bool:
    message = str(error)
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in message or "can't allocate memory" in message
