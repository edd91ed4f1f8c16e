"""The gateway's OpenAPI document, made to tell the truth: every limit the producer enforces, in the schemas.

The request models are the contract's; their limits come from the settings (RERANK_MAX_*,
RERANK_GATEWAY_MAX_DOCUMENTS) and the character policy of `contract.validation`, enforced by the
producer before anything is queued. Generated clients and API gateways read only this document,
so each enforced constraint is written into it here, once, when it is first served. Two rules
JSON Schema cannot state stay in the descriptions: ids unique within a request, and metadata
nested at most 32 deep.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from contract.settings import Settings
from contract.validation import MAX_METADATA_DEPTH, MAX_PASSAGE_TOKENS, MAX_TOP_K
from gateway.settings import GatewaySettings

_CONTROL = r"\u0000-\u0008\u000b\u000c\u000e-\u001f"
TEXT = rf"^[^{_CONTROL}]*$"
"""Text the producer accepts: no C0 control character but tab, newline and carriage return."""
NONBLANK = rf"^[^{_CONTROL}]*[^\s{_CONTROL}][^{_CONTROL}]*$"
"""Such text with at least one character that is not whitespace (queries and ids are stripped first)."""
JOB_ID = r"^[A-Za-z0-9._-]{1,255}$"
"""The characters of the job ids the gateway hands out (UUIDs)."""

EXAMPLE_JOB = {
    "query": "apixaban in atrial fibrillation with chronic kidney disease",
    "candidates": [
        {
            "id": "p1",
            "title": "Apixaban versus warfarin in patients with atrial fibrillation and renal impairment",
            "text": "Apixaban caused less bleeding than warfarin across all levels of kidney function.\n\n"
            "## Results\n\nMajor bleeding was lower with apixaban in patients with an eGFR of 25 to 50.",
        },
        {"id": "p2", "title": "Dietary vitamin K and warfarin dosing", "text": "Diet changes the warfarin dose needed."},
    ],
    "top_k_docs": 1,
    "top_k_chunks": 2,
}
"""A small two-stage job: the example of `POST /v1/evidence` and `POST /v1/jobs`."""


def constrain(app: FastAPI, settings: Settings, gateway: GatewaySettings) -> dict[str, Any]:
    """`app`'s OpenAPI document with the enforced limits written into its request schemas (built once)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = FastAPI.openapi(app)
    schemas = document["components"]["schemas"]
    text = {"type": "string", "maxLength": settings.max_text_chars, "pattern": TEXT}
    query = {"type": "string", "minLength": 1, "maxLength": settings.max_query_chars, "pattern": NONBLANK}
    passage = {**text, "minLength": 1}
    identifier = {"type": "string", "minLength": 1, "maxLength": 512, "pattern": NONBLANK}
    documents = min(gateway.max_documents, settings.max_chunks)
    top_k = {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K}
    tokens = {"type": "integer", "minimum": 1, "maximum": MAX_PASSAGE_TOKENS}
    unique = " Ids must be unique within the request."

    def patch(name: str, **properties: dict[str, Any]) -> None:
        for schema_name in (name, f"{name}-Input"):
            schema = schemas.get(schema_name)
            if schema is not None:
                for field, constraint in properties.items():
                    _narrow(schema["properties"][field], constraint)

    patch("CohereRequest", query=query, documents={"maxItems": documents, "items": {"anyOf": [passage]}}, top_n=top_k, max_tokens_per_doc=tokens)
    patch("TextDocument", text=passage)
    patch("TeiRequest", query=query, texts={"maxItems": documents, "items": passage})
    # Stage 2 needs a chunk: some candidate brings chunks, or a text the default chunker splits.
    chunked = {"anyOf": [{"required": ["text"], "properties": {"text": {"pattern": NONBLANK}}}, {"required": ["chunks"], "properties": {"chunks": {"type": "array", "minItems": 1}}}]}
    patch("TwoStageRequest", query=query, candidates={"maxItems": settings.max_candidates, "contains": chunked}, top_k_docs=top_k, top_k_chunks=top_k, max_passage_tokens=tokens)
    patch("Candidate", id=identifier, title=text, text=text, chunks={"maxItems": settings.max_chunks})
    patch("PaperChunk", id=identifier, section=text, text=passage)
    for name in ("Candidate", "Candidate-Input"):
        if name in schemas:
            candidate = schemas[name]
            # `_has_content`: a title or a text that is not blank.
            candidate["anyOf"] = [
                {"required": ["title"], "properties": {"title": {"pattern": NONBLANK}}},
                {"required": ["text"], "properties": {"text": {"pattern": NONBLANK}}},
            ]
            candidate["description"] += (
                f"{unique} A title or a text must hold more than whitespace; `metadata` nests at most {MAX_METADATA_DEPTH} deep."
            )
    schemas["TwoStageRequest"]["description"] += (
        f"{unique} Some candidate must bring chunks or a text to split into them; all chunks count toward RERANK_MAX_CHUNKS ({settings.max_chunks})."
    )
    app.openapi_schema = document
    return document


def _narrow(schema: dict[str, Any], constraint: dict[str, Any]) -> None:
    """Merge `constraint` into `schema`, or into its non-null branch when it is `X | None`."""
    branches = [b for b in schema.get("anyOf", []) if b.get("type") != "null"]
    target = branches[0] if len(branches) == 1 else schema
    for key, value in constraint.items():
        if key == "items" and "items" in target:
            _narrow(target["items"], value)
        elif key == "anyOf" and "anyOf" in target:
            # The first branch of a union (`str | TextDocument`): the string.
            target["anyOf"][0].update(value[0])
        else:
            target[key] = value
