"""In-process scoring: tokenize, run the scheduler's batches on the caller's thread, return logits.

CPU workers, embedded mode (no broker) and benchmarks score this way. `Scorer` is what ranking
and tasks are typed against; this engine, the threads-pool scorer (scoring/threaded.py) and the
device-process client (scoring/device.py) each satisfy it.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import itertools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

import torch

from contract import tracing
from scoring.facts import ModelFacts
from scoring.layouts import resolve_attention
from scoring.loop import DeviceLoop
from scoring.model import check_model, hub_commit, load_model, load_tokenizer
from scoring.packed import Fusions
from scoring.runner import ModelRunner, Runner, device_memory
from scoring.scheduler import Request
from scoring.tokens import EncodedPair, PairTokenizer, Truncation, tokenized

# Passages per tokenized slice: later slices are tokenized on a thread while earlier ones run, so
# a GPU's first forward waits for one slice's tokens, not the request's; 0 tokenizes up front,
# as a CPU should, where tokenizing shares the cores it would hide behind.
DEFAULT_TOKENIZE_SLICE = {"cpu": 0, "cuda": 32}

OnProgress = Callable[[int, int], None]
"""Called with (unique pairs scored, unique pairs in all) as a request's batches finish."""


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
    cached: int = 0
    """Pairs whose logits came from the score cache (scoring/cache.py), not from a forward pass."""

    @property
    def probabilities(self) -> list[float]:
        """Sigmoid of each fp32 logit."""
        return torch.sigmoid(torch.tensor(self.logits, dtype=torch.float32)).tolist()

    @classmethod
    def of(cls, request: Request, logits: list[float], tokenize_seconds: float, forward_seconds: float) -> Scores:
        """The scores of a finished request."""
        return cls(logits, request.tokens, request.padded, request.batches, tokenize_seconds, forward_seconds, request.splits)


EMPTY = Scores([], 0, 0, 0, 0.0, 0.0)


class Scorer(Protocol):
    """What ranking and tasks need: the loaded model's facts, `score`, and what its process holds on a GPU.

    Every scorer tokenizes in the calling process (`tokenize`) and scores pairs already
    tokenized (`score_pairs`); `score` is the two, and the score cache sits between them.
    """

    facts: ModelFacts
    tokenize: PairTokenizer

    def score(
        self, query: str, passages: Sequence[str], on_batch: OnProgress | None = None, truncation: Truncation | None = None
    ) -> Scores:
        """Logits of each passage against `query`, in input order, passages cut as `truncation` asks."""

    def score_pairs(self, pairs: Sequence[EncodedPair], on_batch: OnProgress | None = None) -> Scores:
        """Logits of pairs already tokenized, in input order."""

    def device_memory(self) -> dict[str, Any]:
        """What the model's process holds on its GPU (scoring.runner.device_memory); empty on a CPU."""


def tokenize_then_score(scorer: Scorer, query: str, passages: Sequence[str], on_batch: OnProgress | None, truncation: Truncation | None) -> Scores:
    """`scorer.score` for the shapes that tokenize in the calling thread and hand pairs on: tokenize, then `score_pairs`."""
    if not passages:
        return EMPTY
    pairs, tokenizing = tokenized(scorer.tokenize, query, passages, truncation)
    return replace(scorer.score_pairs(pairs, on_batch), tokenize_seconds=tokenizing)


class CrossEncoderEngine:
    """Scores query-passage pairs with a single-logit sequence-classification model, in the calling thread."""

    def __init__(
        self, tokenize: PairTokenizer, runner: Runner, *, tokenize_slice: int | None = None, revision: str | None = None
    ) -> None:
        """Join a tokenizer and a runner (of the model at hub `revision`, if pinned); prefer `CrossEncoderEngine.load`."""
        self.tokenize = tokenize
        self.runner = runner
        self.loop = DeviceLoop(runner)
        self.device = runner.device
        self.tokenize_slice = DEFAULT_TOKENIZE_SLICE.get(self.device.type, 0) if tokenize_slice is None else tokenize_slice
        self.facts = ModelFacts(
            name=runner.name, revision=hub_commit(runner.name, revision), device=str(runner.device),
            dtype=str(runner.dtype).removeprefix("torch."), attention=runner.attention, max_length=runner.max_length,
            max_batch_tokens=runner.max_batch_tokens, pid=os.getpid(), weights=runner.weights(),
        )
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0

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
        """Load a cross-encoder from a hub id or a local directory, warmed up and ready to score.

        `attention` unset is `packed` where variable-length FlashAttention can run the model
        (CUDA) and on a CPU, else `padded`.
        """
        _, tokenizer = check_model(name_or_path, revision, max_length)
        model = load_model(name_or_path, revision, device, dtype)
        engine = cls.of(model, tokenizer, name=name_or_path, device=device, max_length=max_length, max_batch_tokens=max_batch_tokens,
                        pad_multiple=pad_multiple, attention=resolve_attention(attention, model, torch.device(device)),
                        fusions=fusions, tokenize_slice=tokenize_slice, revision=revision)
        engine.warmup()
        return engine

    @classmethod
    def of(
        cls, model: torch.nn.Module, tokenizer, *, name: str, device: str = "cpu", max_length: int = 512,
        max_batch_tokens: int | None = None, pad_multiple: int | None = None, attention: str = "padded",
        fusions: Fusions | None = None, tokenize_slice: int | None = None, revision: str | None = None,
    ) -> CrossEncoderEngine:
        """An engine over an already loaded model (on `device`) and its Hugging Face tokenizer."""
        pairs = PairTokenizer(tokenizer, name, max_length)
        runner = ModelRunner(
            model.eval(), name=name, device=device, max_length=max_length, pad_id=pairs.pad_id, uses_type_ids=pairs.uses_type_ids,
            attention=attention, max_batch_tokens=max_batch_tokens, pad_multiple=pad_multiple, fusions=fusions,
        )
        return cls(pairs, runner, tokenize_slice=tokenize_slice, revision=revision)

    def device_memory(self) -> dict[str, Any]:
        """What this process holds on the model's GPU; empty on a CPU."""
        return device_memory(self.device)

    def warmup(self) -> None:
        """Run passes at load so the first real request pays no lazy initialisation (on CUDA, every warm-up shape)."""
        self.score("warm-up query", ["warm-up passage"])
        if self.device.type == "cuda":
            self.runner.warm_shapes()

    @torch.inference_mode()
    def score_pairs(self, pairs: Sequence[EncodedPair], on_batch: OnProgress | None = None) -> Scores:
        """Score pairs already tokenized, in this thread; logits come back in input order."""
        if not pairs:
            return EMPTY
        started = time.perf_counter()
        request = Request(expected=len(pairs))
        self.loop.submit(request)
        self.loop.extend(request, list(pairs), last=True)
        with tracing.span("rerank.forward", where="this process"):
            self._drive(request, on_batch)
        return Scores.of(request, request.pairs.in_input_order(), 0.0, time.perf_counter() - started)

    @torch.inference_mode()
    def score(
        self, query: str, passages: Sequence[str], on_batch: OnProgress | None = None, truncation: Truncation | None = None
    ) -> Scores:
        """Tokenize and score `passages` against `query` (cut as `truncation` asks); logits come back in input order.

        With `tokenize_slice`, passages are tokenized slice by slice on a thread while the
        previous slice's batches run. `tokenize_seconds` is the time spent tokenizing (on that
        thread, overlapping the batches); `forward_seconds` the rest, less any wait for tokens.
        """
        if not passages:
            return EMPTY
        started = time.perf_counter()
        request = Request(expected=len(passages))
        self.loop.submit(request)
        waited = tokenizing = 0.0
        # closing(): a failed batch cancels the slices not yet tokenized now, not when collected.
        with contextlib.closing(self._tokenized_slices(query, list(passages), truncation)) as slices:
            asked = time.perf_counter()
            ready = next(slices)
            waited += time.perf_counter() - asked
            while ready is not None:
                asked = time.perf_counter()
                following = next(slices, None)
                waited += time.perf_counter() - asked
                pairs, seconds = ready
                tokenizing += seconds
                self.loop.extend(request, pairs, last=following is None)
                with tracing.span("rerank.forward", where="this process"):
                    self._drive(request, on_batch)
                ready = following
        logits = request.pairs.in_input_order()
        return Scores.of(request, logits, tokenizing, time.perf_counter() - started - waited)

    def _drive(self, request: Request, on_batch: OnProgress | None) -> None:
        """Step in this thread until every pair added so far is scored (another thread's step may hold some of them)."""
        loop = self.loop
        while True:
            with loop.changed:
                if request.error is not None:
                    raise request.error
                if not request.waiting:
                    if request.done == len(request.pairs.unique):
                        return
                    loop.changed.wait()
                    continue
            loop.step()
            if on_batch is not None:
                on_batch(request.done, request.total)

    def _tokenized_slices(self, query: str, passages: list[str], truncation: Truncation | None) -> Iterator[tuple[list[EncodedPair], float]]:
        count = -(-len(passages) // self.tokenize_slice) if self.tokenize_slice else 1
        if count <= 1:
            yield tokenized(self.tokenize, query, passages, truncation)
            return
        bounds = [round(i * len(passages) / count) for i in range(count + 1)]
        pool = self._tokenizer_pool()
        # The Rust tokenizer releases the GIL while it encodes, so the next slice is tokenized while
        # this thread launches (on CUDA, queues) the current slice's batches.
        # Each slice runs in a copy of this thread's context, so its span joins the request's trace.
        futures = [
            pool.submit(contextvars.copy_context().run, tokenized, self.tokenize, query, passages[a:b], truncation)
            for a, b in itertools.pairwise(bounds)
        ]
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


def engine_for(settings: Any) -> CrossEncoderEngine:
    """The engine `settings` describe: its model, loaded and warmed up; with RERANK_DEVICE_RUNNER, a stand-in runner behind the model's tokenizer."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    elif settings.device_runner or settings.device.startswith("cuda"):
        # The GPU computes; the few small CPU ops around it gain nothing from more threads, whose
        # spinning after each op cost 8 ms of CPU per 10-passage job (benchmarks/fleet_throughput.py).
        torch.set_num_threads(1)
    if settings.device_runner:
        module, _, function = settings.device_runner.partition(":")
        runner = getattr(importlib.import_module(module), function)(settings)
        tokenizer = load_tokenizer(settings.model, settings.model_revision)
        return CrossEncoderEngine(PairTokenizer(tokenizer, settings.model, settings.max_length), runner, revision=settings.model_revision)
    return CrossEncoderEngine.load(
        settings.model, revision=settings.model_revision, device=settings.device, dtype=settings.dtype,
        max_length=settings.max_length, max_batch_tokens=settings.max_batch_tokens, pad_multiple=settings.pad_multiple,
        attention=settings.attention,
    )
