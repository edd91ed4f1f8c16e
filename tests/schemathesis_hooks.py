"""Schemathesis hooks for tests/test_gateway_openapi.py (loaded through SCHEMATHESIS_HOOKS).

JSON Schema cannot say "ids unique within the list": the OpenAPI document states that rule in
its descriptions, and generated jobs are kept to unique ids here. Every other rule is in the schema.
"""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.hook
def filter_body(ctx: Any, body: Any) -> bool:
    """Keep a generated two-stage job only when its candidate ids, and its chunk ids, are unique."""
    candidates = body.get("candidates") if isinstance(body, dict) else None
    if not isinstance(candidates, list):
        return True
    papers = [c.get("id") for c in candidates if isinstance(c, dict)]
    lists = [c["chunks"] for c in candidates if isinstance(c, dict) and isinstance(c.get("chunks"), list)]
    chunks = [k.get("id") for chunk_list in lists for k in chunk_list if isinstance(k, dict) and k.get("id")]
    return len(set(map(str, papers))) == len(papers) and len(set(map(str, chunks))) == len(chunks)
