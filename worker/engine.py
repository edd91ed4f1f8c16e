"""The scoring engine: tokenize, forward, postprocess. Knows nothing of Celery."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tokenizers import Encoding
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from producer.errors import ModelLoadError

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Padded tokens per forward pass. On a CPU small batches stay in cache and pad less: on 2 cores
# (base shape, benchmarks/sweep.py) 2048 tokens scored 100 docs in 31.5 s against 33.4 s at 4096
# and 36.8 s at 16384, and 100 chunks in 20.6 s against 23.0 s and 27.3 s; 1024 was no faster.
# GPUs need large batches to fill their cores (on an H200, 16k-64k were within noise).
DEFAULT_BATCH_TOKENS = {"cpu": 2048, "cuda": 32768}
# Batch widths are rounded up to a multiple of this. On CUDA a batch width never seen before is
# slow: a fresh H200 worker (v2-m3 shape) took a median 187 ms, and up to 1.6 s, for its first
# twelve 100-doc requests against 113 ms for the same requests again; rounding to 64 (and
# warming each width at load) gave 116 ms and 112 ms (benchmarks/fresh_shapes.py). On a CPU
# there is no such cost, and rounding would only add padding.
DEFAULT_PAD_MULTIPLE = {"cpu": 1, "cuda": 64}
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
    ) -> None:
        """Wrap a loaded model and tokenizer; prefer `CrossEncoderEngine.load`."""
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
        self.attention = "padded"
        self._backend = backend
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._pair_specials = tokenizer.num_special_tokens_to_add(pair=True)
        self._query_cap = max_length * 3 // 4
        self._uses_type_ids = "token_type_ids" in tokenizer.model_input_names

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
    ) -> CrossEncoderEngine:
        """Load a cross-encoder from a hub id or a local directory, ready to score."""
        torch_dtype = resolve_dtype(dtype, device)
        if torch_dtype == torch.bfloat16 and device == "cpu" and not cpu_has_native_bf16():
            log.warning("bf16 requested on a CPU without AVX512-BF16 or AMX: expect it to be several times slower than fp32")
        config, tokenizer = load_config_and_tokenizer(name_or_path, revision)
        limit = usable_length(config, tokenizer)
        if max_length > limit:
            raise ModelLoadError(
                f"RERANK_MAX_LENGTH={max_length} exceeds what {name_or_path} can read ({limit} tokens); "
                f"set RERANK_MAX_LENGTH to {limit} or less"
            )
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
        )
        engine.warmup()
        return engine

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model's weights are held in."""
        return next(self.model.parameters()).dtype

    def warmup(self) -> None:
        """Run passes at load so the first real request pays no lazy initialisation.

        On CUDA with rounded widths, that is one full batch at every width a request can use
        (an out-of-memory batch is split, as in scoring).
        """
        self.score("warm-up query", ["warm-up passage"])
        if self.device.type == "cuda" and self.pad_multiple > 1:
            self._warm_widths()
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _warm_widths(self) -> None:
        filler = self._pad_id + 1
        for width in sorted({self._width(n) for n in range(1, self.max_length + 1)}):
            rows = max(1, self.max_batch_tokens // width)
            self._forward_with_backoff([EncodedPair([filler] * width, [0] * width)] * rows)

    def tokenize(self, query: str, passages: Sequence[str]) -> list[EncodedPair]:
        """Encode pairs, capping the query at 3/4 of max_length and truncating only passages."""
        encoded_query = self._backend.encode(query, add_special_tokens=False)
        encoded_query.truncate(self._query_cap)
        budget = self.max_length - len(encoded_query.ids) - self._pair_specials
        pairs = []
        for encoded in self._backend.encode_batch(list(passages), add_special_tokens=False):
            encoded.truncate(budget)
            pair: Encoding = self._backend.post_process(encoded_query, encoded, add_special_tokens=True)
            pairs.append(EncodedPair(pair.ids, pair.type_ids))
        return pairs

    @torch.inference_mode()
    def forward(
        self, pairs: Sequence[EncodedPair], on_batch: Callable[[int, int], None] | None = None
    ) -> tuple[list[float], int, int]:
        """Return fp32 logits in input order, padded tokens used, and batches run.

        Identical pairs are scored once, so they get identical scores (a GEMM may round a row
        differently depending on its place in the batch). Pairs are sorted by length and packed
        into batches of at most `max_batch_tokens` padded tokens, so short passages are not
        padded to the longest one in the request. `on_batch(done, total)` is called after each
        planned batch (an out-of-memory split still counts as one).
        """
        first_of: dict[tuple[int, ...], int] = {}
        owner = [first_of.setdefault(tuple(p.input_ids), i) for i, p in enumerate(pairs)]
        unique = list(first_of.values())
        order = sorted(unique, key=lambda i: len(pairs[i].input_ids), reverse=True)
        logits = [0.0] * len(pairs)
        padded = 0
        batches = 0
        planned = self._batches(order, pairs)
        for done, batch in enumerate(planned, 1):
            batch_logits, batch_padded, batch_runs = self._forward_with_backoff([pairs[i] for i in batch])
            for i, value in zip(batch, batch_logits):
                logits[i] = value
            padded += batch_padded
            batches += batch_runs
            if on_batch is not None:
                on_batch(done, len(planned))
        return [logits[owner[i]] for i in range(len(pairs))], padded, batches

    def score(
        self, query: str, passages: Sequence[str], on_batch: Callable[[int, int], None] | None = None
    ) -> Scores:
        """Tokenize and score `passages` against `query`; logits come back in input order."""
        if not passages:
            return Scores([], 0, 0, 0, 0.0, 0.0)
        started = time.perf_counter()
        pairs = self.tokenize(query, passages)
        tokenized = time.perf_counter()
        logits, padded, batches = self.forward(pairs, on_batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        finished = time.perf_counter()
        return Scores(
            logits=logits,
            tokens=sum(len(p.input_ids) for p in pairs),
            padded_tokens=padded,
            batches=batches,
            tokenize_seconds=tokenized - started,
            forward_seconds=finished - tokenized,
        )

    def _batches(self, order: list[int], pairs: Sequence[EncodedPair]) -> list[list[int]]:
        batches: list[list[int]] = []
        for i in order:
            # The first pair of a batch is its longest, since `order` is sorted by length.
            if batches and (len(batches[-1]) + 1) * self._width(len(pairs[batches[-1][0]].input_ids)) <= self.max_batch_tokens:
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    def _forward_with_backoff(self, pairs: list[EncodedPair]) -> tuple[list[float], int, int]:
        try:
            return self._forward_batch(pairs), len(pairs) * self._width(max(len(p.input_ids) for p in pairs)), 1
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _is_out_of_memory(e) or len(pairs) == 1:
                raise
            log.warning("out of memory on a batch of %d pairs; splitting it in two", len(pairs))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(pairs) // 2
            first = self._forward_with_backoff(pairs[:half])
            second = self._forward_with_backoff(pairs[half:])
            return first[0] + second[0], first[1] + second[1], first[2] + second[2]

    def _width(self, longest: int) -> int:
        """Padded width of a batch whose longest pair has `longest` tokens."""
        rounded = -(-longest // self.pad_multiple) * self.pad_multiple
        return max(longest, min(rounded, self.max_length))

    def _forward_batch(self, pairs: list[EncodedPair]) -> list[float]:
        width = self._width(max(len(p.input_ids) for p in pairs))
        input_ids = torch.full((len(pairs), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)
        type_ids = torch.zeros((len(pairs), width), dtype=torch.long)
        for row, pair in enumerate(pairs):
            n = len(pair.input_ids)
            input_ids[row, :n] = torch.tensor(pair.input_ids)
            attention_mask[row, :n] = 1
            type_ids[row, :n] = torch.tensor(pair.type_ids)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._uses_type_ids:
            inputs["token_type_ids"] = type_ids
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        output = self.model(**inputs)
        # Upcast before anything else: a half-precision logit saturates the sigmoid into ties.
        return output.logits[:, 0].float().cpu().tolist()


def load_config_and_tokenizer(name_or_path: str, revision: str | None = None) -> tuple[AutoConfig, PreTrainedTokenizerBase]:
    """Load the config and tokenizer (no weights, no CUDA) and check the model is a cross-encoder."""
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
    return config, tokenizer


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
