"""Request and result models: the contract between producers and workers."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictInt,
    StringConstraints,
    model_serializer,
    model_validator,
)

Query = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Identifier = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=512)]
Digest = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
StoreKey = Annotated[str, StringConstraints(pattern=r"^rerank\.job\.[^\x00-\x20]{1,255}$")]
MAX_WINDOWS = 32


def _whole(value: Any) -> Any:
    # JSON does not tell 20 from 20.0 (JSON Schema's "integer" admits both); a fraction, a bool or a string stays refused.
    return int(value) if type(value) is float and value.is_integer() else value


def count(ge: int = 1, le: int | None = None) -> Any:
    """The type of a whole number from `ge` to `le` as a caller writes it: 20 or 20.0, never True or "20".

    The bounds come before the conversion so that they reach the JSON schema.
    """
    return Annotated[StrictInt, Field(ge=ge, le=le), BeforeValidator(_whole)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Truncate = Literal["end", "start", "never"]
"""How a passage longer than its room is cut: its end (TEI's `Right`), its start (TEI's `Left`), or never (refused instead)."""


class _Truncation(_Model):
    """The per-request truncation controls every request shape carries; unset, pairs are cut at the end to fit RERANK_MAX_LENGTH."""

    max_passage_tokens: count() | None = Field(
        None, description="Keep at most this many tokens of each passage (Cohere's `max_tokens_per_doc`); the pair still fits RERANK_MAX_LENGTH."
    )
    truncate: Truncate | None = Field(
        None, description="`end` (unset): cut a passage's end; `start`: cut its start; `never`: refuse a passage (or query) that would be cut."
    )


class PaperChunk(_Model):
    """A chunk of a paper supplied by the caller; `id` defaults to `<paper id>#<n>`."""

    id: Identifier | None = None
    section: str | None = None
    text: str = Field(min_length=1)


class Candidate(_Model):
    """A candidate paper: stage 1 scores its title and abstract, stage 2 its chunks."""

    id: Identifier
    title: str = ""
    text: str = ""
    chunks: list[PaperChunk] | None = None
    metadata: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _has_content(self) -> Candidate:
        if not (self.title.strip() or self.text.strip()):
            raise ValueError(f"candidate {self.id!r} has neither a title nor a text to score")
        return self


class Chunk(_Model):
    """A passage scored in stage 2, with the paper it came from."""

    id: Identifier
    doc_id: Identifier
    title: str = ""
    section: str | None = None
    text: str = Field(min_length=1)


class DocumentsRequest(_Truncation):
    """Stage 1: score candidates by `Title + abstract` and keep the best `top_k`."""

    query: Query
    candidates: list[Candidate] = Field(min_length=1)
    # Counts and flags are strict here and below: `top_k=True` or `"5"` is a caller's bug, not a number to guess at.
    top_k: count() = 20
    return_logits: StrictBool = False
    windows: count(le=MAX_WINDOWS) = Field(
        1,
        description="Score up to this many windows of each text (the first is the abstract) and keep the best.",
    )

    @model_validator(mode="after")
    def _unique_ids(self) -> DocumentsRequest:
        _reject_duplicates(c.id for c in self.candidates)
        return self


class Stored(_Model):
    """A request kept in Redis beside its task message (producer.payloads): its hash, its field, a digest of its bytes."""

    key: StoreKey
    field: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_]{1,32}$")]
    digest: Digest


class Pool(_Model):
    """A two-stage job's chunk pool, kept in Redis: field `<n>` of `key` holds candidate n's chunks, in candidate order."""

    key: StoreKey
    counts: list[Annotated[StrictInt, Field(ge=0)]] = Field(min_length=1, description="Chunks of each candidate.")
    digests: list[Digest] = Field(min_length=1, description="A digest of each candidate's stored chunks.")

    @model_validator(mode="after")
    def _one_per_candidate(self) -> Pool:
        if len(self.counts) != len(self.digests):
            raise ValueError(f"{len(self.digests)} digests for {len(self.counts)} candidates; send one per candidate")
        return self


class ChunksRequest(_Truncation):
    """Stage 2: score chunks; with a stage-1 result only the kept papers' chunks are scored."""

    query: Query
    chunks: list[Chunk] | None = Field(None, min_length=1, description="The chunks, unless they are kept in `pool`.")
    pool: Pool | None = Field(
        None, description="In a two-stage job: where the job's chunks are kept; stage 2 reads only those of the papers stage 1 kept."
    )
    top_k: count() | None = None
    return_logits: StrictBool = False
    candidate_ids: list[Identifier] | None = Field(
        None,
        description="In a two-stage job, the ids of the candidates stage 1 scored, in order: the stage-1 result "
        "stage 2 receives must refer to these and nothing else.",
    )
    positions: list[Annotated[StrictInt, Field(ge=0)]] | None = Field(
        None,
        description="In a two-stage job whose stage 1 sent on only the chunks of the papers it kept: where each "
        "chunk sits in the job's whole chunk pool, strictly increasing. Results' `index` values are these.",
    )
    digests: list[Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]] | None = Field(
        None,
        description="In a two-stage job, one per chunk: `contract.formats.chunk_digest` of the chunk at its place in the "
        "job's pool; stage 2 scores a chunk only if it is the one the producer sent there. Required with `positions`.",
    )

    @model_validator(mode="after")
    def _unique_ids(self) -> ChunksRequest:
        if (self.chunks is None) == (self.pool is None):
            raise ValueError("send the chunks, or (in a two-stage job) the pool they are kept in: one of them")
        if self.pool is not None and (self.candidate_ids is None or len(self.candidate_ids) != len(self.pool.counts)):
            raise ValueError("a pool needs candidate_ids, one per candidate it keeps chunks for")
        if self.pool is not None and (self.positions is not None or self.digests is not None):
            raise ValueError("positions and digests come with chunks sent in the request, not with a pool")
        _reject_duplicates(c.id for c in self.chunks or ())
        if self.candidate_ids is not None:
            _reject_duplicates(self.candidate_ids)
        if self.positions is not None:
            if len(self.positions) != len(self.chunks or ()):
                raise ValueError(f"{len(self.positions)} positions for {len(self.chunks)} chunks; send one per chunk, or none")
            if any(a >= b for a, b in zip(self.positions, self.positions[1:])):
                raise ValueError("positions must be strictly increasing: each chunk's place in the pool, in pool order")
        return self


class PassagesRequest(_Truncation):
    """Plain pairs: each passage is scored with the query exactly as sent, with no `Title:`/`Section:` template."""

    query: Query
    passages: list[Annotated[str, StringConstraints(min_length=1)]] = Field(min_length=1)
    top_k: count() | None = None
    return_logits: StrictBool = False


class RankedItem(_Model):
    """One scored input; `index` points into the list the caller sent."""

    index: int
    id: str
    score: float = Field(ge=0.0, le=1.0, description="Sigmoid of the fp32 logit.")
    logit: float | None = None
    doc_id: str | None = None
    document: Candidate | Chunk | None = Field(
        None, description="What the caller sent for this item, joined back by the client when asked; never sent over the broker."
    )

    @model_serializer(mode="wrap")
    def _omit_absent_document(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Workers never fill `document`; leaving the key out keeps their messages as they were.
        data = handler(self)
        if self.document is None:
            data.pop("document", None)
        return data


class ScoringInfo(_Model):
    """How and where a result was computed."""

    model: str
    revision: str | None = Field(None, description="The hub commit of the model weights that scored this; None for a local directory outside a hub cache.")
    device: str
    dtype: str
    attention: str | None = Field(None, description="`packed` or `padded`: how the forward pass laid out the batch's tokens.")
    max_length: int
    pairs: int
    tokens: int
    padded_tokens: int
    batches: int
    oom_splits: int = Field(0, description="Batches split in two after running out of device memory while scoring this (also counted in `batches`).")
    tokenize_ms: float
    forward_ms: float
    worker: str | None = None
    pid: int
    model_loads: int = Field(description="Times this worker process has loaded the model; 1 in a healthy worker.")
    cached_pairs: int = Field(
        0, ge=0, description="Of `pairs`, those whose logits came from the score cache (RERANK_SCORE_CACHE) instead of a forward pass."
    )

    @model_serializer(mode="wrap")
    def _omit_no_cache(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Left out when 0, so producers that predate the field still read results of workers without a cache.
        data = handler(self)
        if not self.cached_pairs:
            data.pop("cached_pairs", None)
        return data


class RerankResult(_Model):
    """A ranking: items sorted by score (descending), ties in input order."""

    stage: Literal["documents", "chunks", "passages"]
    query: str
    items: list[RankedItem]
    scored: int = Field(description="How many inputs were scored before top_k was applied.")
    info: ScoringInfo


class TwoStageResult(_Model):
    """Both rankings of a two-stage job."""

    documents: RerankResult
    chunks: RerankResult


class TwoStageRequest(_Truncation):
    """One two-stage job as a caller describes it, e.g. one line of a batch file."""

    query: Query
    candidates: list[Candidate] = Field(min_length=1)
    top_k_docs: count() = 20
    top_k_chunks: count() | None = None
    min_score: float | None = Field(None, ge=0.0, le=1.0)
    windows: count(le=MAX_WINDOWS) | None = None


def _reject_duplicates(ids: Any) -> None:
    seen: set[str] = set()
    for item_id in ids:
        if item_id in seen:
            raise ValueError(f"id {item_id!r} appears more than once; ids must be unique")
        seen.add(item_id)
