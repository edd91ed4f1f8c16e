"""Query+passage pairs as token ids: the tokenizer side of scoring (no model, no device)."""

from __future__ import annotations

import re
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from contract import tracing
from contract.errors import InvalidRequest, ModelLoadError

# Characters read per token a pair still needs; tokenizers average 3-6 characters per token on
# prose, and a cut that yields too few tokens is widened (PairTokenizer._passage_ids).
CHARS_PER_TOKEN = 8

_WORD_END = re.compile(r"(?<=\S)\s")


Ids = array
"""Token ids as a C int array (`array("i")`): copied, sliced, joined and handed to torch without a Python int per token."""


@dataclass(frozen=True)
class Truncation:
    """How a request asks its passages cut: at most `max_passage_tokens` of each (None: all that fit), at the `end` or `start`, or `never`."""

    max_passage_tokens: int | None = None
    truncate: str = "end"

    @classmethod
    def of(cls, request: object) -> Truncation:
        """The truncation a request (any of the contract's request shapes) asks for."""
        return cls(getattr(request, "max_passage_tokens", None), getattr(request, "truncate", None) or "end")


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of one query+passage pair, specials included, and its type ids where the model reads them (else None)."""

    input_ids: Ids
    type_ids: Ids | None = None

    def __post_init__(self) -> None:
        for name in ("input_ids", "type_ids"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, array):
                object.__setattr__(self, name, array("i", value))


def joined(pairs: Iterable[EncodedPair], types: bool = False) -> Ids:
    """Every pair's ids (or type ids, zeros where a pair has none) end to end, in one array."""
    out = array("i")
    for pair in pairs:
        if not types:
            out.extend(pair.input_ids)
        elif pair.type_ids is not None:
            out.extend(pair.type_ids)
        else:
            out.extend(array("i", bytes(out.itemsize * len(pair.input_ids))))
    return out


def tokenized(
    tokenize: PairTokenizer, query: str, passages: Sequence[str], truncation: Truncation | None = None
) -> tuple[list[EncodedPair], float]:
    """`tokenize(query, passages, truncation)` traced as `rerank.tokenize`, and the wall seconds it took (what a result's `tokenize_ms` adds up)."""
    started = time.perf_counter()
    with tracing.span("rerank.tokenize", pairs=len(passages)):
        pairs = tokenize(query, passages, truncation)
    return pairs, time.perf_counter() - started


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


class PairTokenizer:
    """Encodes (query, passages) into pairs of at most `max_length` tokens, truncating only passages."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, name: str, max_length: int) -> None:
        """Wrap a loaded Hugging Face tokenizer, which must be a fast (Rust) one."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ModelLoadError(f"{name}: a fast (Rust) tokenizer is required; ship tokenizer.json with the model")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.backend = backend
        # encode_batch_fast skips character offsets, which scoring never reads (tokenizers >= 0.21).
        self._encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        self.template = PairTemplate.of(backend)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.uses_type_ids = "token_type_ids" in tokenizer.model_input_names
        self._query_cap = max_length * 3 // 4

    def __call__(self, query: str, passages: Sequence[str], truncation: Truncation | None = None) -> list[EncodedPair]:
        """Encode pairs, capping the query at 3/4 of max_length and cutting only passages, as `truncation` asks."""
        truncation = truncation or Truncation()
        template = self.template
        query_ids = self.backend.encode(query, add_special_tokens=False).ids
        if len(query_ids) > self._query_cap and truncation.truncate == "never":
            raise InvalidRequest(
                f"the query has {len(query_ids)} tokens, over the {self._query_cap} a query may take (3/4 of RERANK_MAX_LENGTH="
                f"{self.max_length}), and truncation was refused (truncate=never); shorten the query, or allow truncation"
            )
        query_ids = query_ids[: self._query_cap]
        room = self.max_length - len(query_ids) - template.specials
        keep = room if truncation.max_passage_tokens is None else min(room, truncation.max_passage_tokens)
        if truncation.truncate == "start":
            kept = [ids[len(ids) - keep :] if len(ids) > keep else ids for ids in self._passage_tail_ids(passages, keep)]
        else:
            kept = self._passage_ids(passages, keep + 1 if truncation.truncate == "never" else keep)
            if truncation.truncate == "never":
                self._refuse_cuts(kept, keep, room, len(query_ids))
            kept = [ids[:keep] for ids in kept]
        # The pair is assembled from the template's lists rather than by `post_process`, which
        # holds the GIL for ~0.3 ms a pair (35 ms per 100 docs here) that tokenizing ahead must not.
        head, suffix = array("i", template.prefix + query_ids + template.middle), array("i", template.suffix)
        if not self.uses_type_ids:
            return [EncodedPair(head + array("i", ids) + suffix) for ids in kept]
        head_types = array("i", template.prefix_types + [template.query_type] * len(query_ids) + template.middle_types)
        suffix_types, passage_type = array("i", template.suffix_types), array("i", [template.passage_type])
        return [EncodedPair(head + array("i", ids) + suffix, head_types + passage_type * len(ids) + suffix_types) for ids in kept]

    def _refuse_cuts(self, ids: list[list[int]], keep: int, room: int, query_tokens: int) -> None:
        """Raise `InvalidRequest` naming the first passage with more than `keep` tokens (truncate=never)."""
        for n, passage in enumerate(ids):
            if len(passage) > keep:
                why = (
                    f"max_passage_tokens={keep}" if keep < room
                    else f"the {room} its pair has room for (RERANK_MAX_LENGTH={self.max_length}, less the query's {query_tokens} and the special tokens)"
                )
                raise InvalidRequest(
                    f"passages.{n} has more tokens than {why}, and truncation was refused (truncate=never); "
                    "shorten it, or allow truncation (truncate=end or start)"
                )

    def _passage_ids(self, passages: Sequence[str], budget: int) -> list[list[int]]:
        """Token ids of each passage's first `budget` tokens or more, without tokenizing text past them.

        Tokenizing runs in Rust, where a task's soft time limit cannot interrupt it, so a 100,000-
        character passage must not be tokenized whole to keep its first 500 tokens. Each passage
        is cut at a word boundary after CHARS_PER_TOKEN characters per needed token; the tokens
        before the cut are those of the whole text. A cut that yields too few tokens (long
        tokens, whitespace runs) is widened fourfold until it yields enough or covers the text.
        """
        return self._ids_of_pieces(passages, budget, _head)


    def _passage_tail_ids(self, passages: Sequence[str], budget: int) -> list[list[int]]:
        """Token ids ending each passage, `budget` of them or more, without tokenizing text before them (as `_passage_ids`, from the end).

        A tail starts at a whitespace that follows a word, so the tokenizer splits it where it
        splits the whole text, and its tokens are the last tokens of the whole text.
        """
        return self._ids_of_pieces(passages, budget, _tail)

    def _ids_of_pieces(self, passages: Sequence[str], budget: int, piece: Callable[[str, int], str]) -> list[list[int]]:
        """Token ids of `piece(text, chars)` for each passage, the piece widened fourfold until it holds `budget` tokens or the whole text."""
        chars = (budget + 1) * CHARS_PER_TOKEN
        pieces = [piece(text, chars) for text in passages]
        ids = [encoded.ids for encoded in self._encode_batch(pieces, add_special_tokens=False)]
        for n, text in enumerate(passages):
            wider = chars
            while len(ids[n]) < budget and len(pieces[n]) < len(text):
                wider *= 4
                pieces[n] = piece(text, wider)
                ids[n] = self.backend.encode(pieces[n], add_special_tokens=False).ids
        return ids


def _head(text: str, chars: int) -> str:
    """The first `chars` characters of `text`, ending before a whitespace when one is in the second half, so no word is cut."""
    if len(text) <= chars:
        return text
    head = text[:chars]
    space = max(head.rfind(" "), head.rfind("\n"), head.rfind("\t"))
    return head[:space] if space > chars // 2 else head


def _tail(text: str, chars: int) -> str:
    """The last `chars` characters of `text`, starting at a whitespace after a word when one is in the first half, so no word is cut."""
    if len(text) <= chars:
        return text
    start = len(text) - chars
    boundary = _WORD_END.search(text, max(start, 1), start + chars // 2)
    return text[boundary.start() if boundary else start :]


def _find(haystack: list[int], needle: list[int], start: int) -> int:
    """Index of the first occurrence of `needle` in `haystack` from `start`, or -1."""
    for i in range(start, len(haystack) - len(needle) + 1):
        if haystack[i : i + len(needle)] == needle:
            return i
    return -1
