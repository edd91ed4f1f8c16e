"""The request and response shapes of the HTTP APIs clients already speak, and their translation to one producer call.

Cohere `/v1/rerank` and `/v2/rerank` (Jina's `/v1/rerank` is Cohere v1 with `model` and `usage`
added) and text-embeddings-inference's `/rerank` all become `PassagesRequest`: each document is
scored with the query exactly as sent. Cohere and Jina report probabilities (the sigmoid of the
model's logit); TEI reports them too unless `raw_scores` asks for the logits.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints

from contract.schemas import Query, RerankResult, Truncate, count

MODEL_NAME = r"^[^\u0000-\u001f\u007f]{1,512}$"
"""A model's name, slug or alias: printable, at most 512 characters."""


class TextDocument(BaseModel):
    """A document as an object; only `text` is scored (other fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    text: str


class CohereRequest(BaseModel):
    """Cohere's `/v1/rerank` and `/v2/rerank` request; Jina's `/v1/rerank` is the same."""

    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, StringConstraints(pattern=MODEL_NAME)] | None = Field(
        None, description="A model a worker serves (name, slug or alias); unset: RERANK_MODEL."
    )
    query: Query
    documents: list[str | TextDocument] = Field(min_length=1, description="Strings or `{text}` objects, scored exactly as sent.")
    top_n: count() | None = Field(None, description="Return only the best `top_n`; unset: all.")
    return_documents: StrictBool = Field(False, description="Return each document's text with its result.")
    max_tokens_per_doc: count() | None = Field(
        None, description="Keep at most this many tokens of each document (its end is cut); a pair never exceeds RERANK_MAX_LENGTH tokens."
    )

    def texts(self) -> list[str]:
        """The documents as the strings to score."""
        return [d if isinstance(d, str) else d.text for d in self.documents]


class CohereResult(BaseModel):
    """One ranked document: its place in the request and its probability."""

    index: int
    relevance_score: float
    document: TextDocument | None = None


class CohereResponse(BaseModel):
    """Cohere's rerank response, best first; on `/v1/rerank` also Jina's `model` and `usage`."""

    id: str = Field(description="The job id (Cohere's field): `GET /v1/jobs/{job_id}` with the same key fetches it again.")
    results: list[CohereResult]
    meta: dict[str, object]
    model: str | None = None
    usage: dict[str, int] | None = None


class TeiRequest(BaseModel):
    """text-embeddings-inference's `/rerank` request."""

    model_config = ConfigDict(extra="ignore")

    query: Query
    texts: list[str] = Field(min_length=1)
    raw_scores: StrictBool = Field(False, description="Scores as the model's logits instead of probabilities.")
    return_text: StrictBool = False
    truncate: StrictBool | None = Field(
        None, description="`false`: a text too long for its pair (RERANK_MAX_LENGTH tokens) is refused (422); `true` or unset: it is cut, never the query."
    )
    truncation_direction: Literal["Right", "right", "Left", "left"] = Field(
        "Right", description="Which end of a text too long is cut: `Right` its end, `Left` its start (the query is kept whole either way)."
    )

    def cut(self) -> Truncate:
        """Our `truncate` for this request's `truncate` and `truncation_direction`."""
        if self.truncate is False:
            return "never"
        return "start" if self.truncation_direction.lower() == "left" else "end"


class TeiRank(BaseModel):
    """One ranked text, as TEI returns it."""

    index: int
    score: float
    text: str | None = None


def cohere_response(job_id: str, result: RerankResult, texts: list[str], request: CohereRequest, version: str) -> CohereResponse:
    """The Cohere (v1: and Jina) answer for `result`."""
    results = [
        CohereResult(
            index=item.index,
            relevance_score=item.score,
            document=TextDocument(text=texts[item.index]) if request.return_documents else None,
        )
        for item in result.items
    ]
    meta: dict[str, object] = {"api_version": {"version": version}, "billed_units": {"search_units": 1}}
    if version == "1":
        return CohereResponse(id=job_id, results=results, meta=meta, model=result.info.model, usage={"total_tokens": result.info.tokens})
    return CohereResponse(id=job_id, results=results, meta=meta)


def tei_response(result: RerankResult, request: TeiRequest) -> list[TeiRank]:
    """TEI's answer for `result`: logits when `raw_scores`, else probabilities."""
    return [
        TeiRank(
            index=item.index,
            score=item.logit if request.raw_scores and item.logit is not None else item.score,
            text=request.texts[item.index] if request.return_text else None,
        )
        for item in result.items
    ]
