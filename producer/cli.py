"""`rerank`: run a two-stage job from a JSON file and print the rankings."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from producer.client import RerankClient
from producer.errors import InvalidRequest, RerankError
from producer.schemas import Candidate, TwoStageResult
from producer.settings import Settings

EXIT_INVALID = 2
EXIT_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    """Return the `rerank` argument parser."""
    parser = argparse.ArgumentParser(prog="rerank", description="Two-stage BGE re-ranking on Celery.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="Run a two-stage job from a JSON file (query + candidates).")
    run.add_argument("job", type=Path, help='JSON: {"query": ..., "candidates": [...], "top_k_docs"?, "top_k_chunks"?}')
    run.add_argument("--top-k-docs", type=int, help="Papers kept by stage 1 (default: the file's, else 20).")
    run.add_argument("--top-k-chunks", type=int, help="Chunks returned by stage 2 (default: the file's, else all).")
    run.add_argument("--timeout", type=float, default=600.0, help="Seconds to wait for the result.")
    run.add_argument("--json", action="store_true", help="Print the result as JSON.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `rerank`; returns 0, 1 (job failed) or 2 (invalid input or settings)."""
    args = build_parser().parse_args(argv)
    try:
        job = json.loads(args.job.read_text())
        client = RerankClient(Settings())
        candidates = [Candidate.model_validate(c) for c in job["candidates"]]
        result = client.two_stage(
            job["query"],
            candidates,
            top_k_docs=args.top_k_docs or job.get("top_k_docs", 20),
            top_k_chunks=args.top_k_chunks or job.get("top_k_chunks"),
            timeout=args.timeout,
        )
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValidationError, InvalidRequest) as e:
        print(f"rerank: invalid job {args.job}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_INVALID
    except RerankError as e:
        print(f"rerank: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        print(render(result, candidates, client))
    return 0


def render(result: TwoStageResult, candidates: list[Candidate], client: RerankClient) -> str:
    """Format both rankings as plain-text tables, joining titles and texts back from the input."""
    by_id = {c.id: c for c in candidates}
    pool = client.chunk_pool(candidates)
    info = result.documents.info
    lines = [
        f"query: {result.documents.query}",
        f"model: {info.model}  device: {info.device}  dtype: {info.dtype}  worker: {info.worker}",
        "",
        f"Stage 1: {len(result.documents.items)} of {result.documents.scored} papers "
        f"({info.tokenize_ms:.0f} ms tokenize, {info.forward_ms:.0f} ms forward)",
        _row("rank", "score", "id", "title"),
    ]
    lines += [_row(n, f"{item.score:.4f}", item.id, by_id[item.id].title) for n, item in enumerate(result.documents.items, 1)]
    chunk_info = result.chunks.info
    lines += [
        "",
        f"Stage 2: {len(result.chunks.items)} of {result.chunks.scored} chunks "
        f"({chunk_info.tokenize_ms:.0f} ms tokenize, {chunk_info.forward_ms:.0f} ms forward)",
        _row("rank", "score", "chunk", "section: text"),
    ]
    for n, item in enumerate(result.chunks.items, 1):
        chunk = pool[item.index]
        lines.append(_row(n, f"{item.score:.4f}", item.id, f"{chunk.section or 'N/A'}: {chunk.text}"))
    return "\n".join(lines)


def _row(rank: Any, score: str, ident: str, text: str, width: int = 72) -> str:
    text = " ".join(text.split())
    return f"{rank!s:>4}  {score:>6}  {ident:<18.18}  {text[:width]}{'…' if len(text) > width else ''}"


if __name__ == "__main__":
    sys.exit(main())
