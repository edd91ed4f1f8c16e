"""The benchmark's inputs: synthetic evidence and random-weight models with real BGE shapes."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from contract.formats import document_passage
from producer import Candidate

ROOT = Path(__file__).parents[1]
CACHE = ROOT / ".bench-cache"
sys.path.insert(0, str(ROOT / "examples"))

from evidence import QUERY, make_candidates, make_chunks  # noqa: E402

__all__ = ["QUERY", "make_candidates", "make_chunks", "model_dir", "papers", "shape_name", "stage1_texts", "tokenizer_text"]


def papers(n: int, seed: int = 5) -> list[Candidate]:
    """`n` synthetic candidate papers, validated as the producer would."""
    return [Candidate.model_validate(p) for p in make_candidates(n, seed=seed)]


def stage1_texts(n: int, seed: int = 5) -> list[str]:
    """The stage-1 passages (seed format: title and abstract) of `papers(n, seed)`."""
    return [document_passage(p) for p in papers(n, seed)]


def tokenizer_text() -> list[str]:
    """Sentences to train the stand-in tokenizer on: synthetic evidence plus the tests' corpus."""
    papers = make_candidates(400, seed=1)
    text = " ".join(f"{p['title']}. {p['text']}" for p in papers)
    shipped = (ROOT / "tests" / "data" / "medical_corpus.txt").read_text().splitlines()
    return re.split(r"(?<=[.:])\s+", text) + shipped


def shape_name(name: str) -> str:
    """`--shape` for benchmarks that load no model themselves: a name of worker/synthetic.py's SHAPES.

    That module imports transformers (seconds of CPU), so it is read only when no model of this
    name is built yet; a built one had a valid name.
    """
    if (CACHE / name / "config.json").exists():
        return name
    from worker.synthetic import SHAPES

    if name not in SHAPES:
        raise argparse.ArgumentTypeError(f"unknown shape {name!r}: choose from {', '.join(sorted(SHAPES))}")
    return name


def model_dir(shape: str) -> Path:
    """Build (once) and return a random-weight cross-encoder with the named shape."""
    path = CACHE / shape
    if not (path / "config.json").exists():
        # Here, not at the top: processes that only send jobs (producers, probes) need no transformers.
        from worker.synthetic import SHAPES, build_cross_encoder

        print(f"building a random-weight {shape} model {SHAPES[shape]} in {path}", flush=True)
        build_cross_encoder(path, tokenizer_text(), shape, vocab_size=4000)
    return path


def cpu_name() -> str:
    """The CPU's model name, from /proc/cpuinfo."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def cpu_features() -> str:
    """The instruction sets that decide CPU GEMM speed: AVX-512, its BF16 extension, AMX."""
    flags = set(next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "").split())
    found = [name for flag, name in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX")) if flag in flags]
    return ", ".join(found) or "no AVX-512"
