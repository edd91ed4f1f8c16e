"""First requests of a fresh worker, each with batch widths it has not seen: the case for RERANK_PAD_MULTIPLE.

    python -m benchmarks.fresh_shapes --device cuda:0 --pad-multiple 1
    python -m benchmarks.fresh_shapes --device cuda:0 --pad-multiple 64

Run each in its own process: the point is what a freshly started worker does. Loads the engine
(warm-up included; padded attention, where batches have widths), runs the GPU for a second so
clocks are up, then scores --requests (12) different corpora of --docs (100) docs twice: first
with widths never seen before, then the same again. Records the tokens, padded tokens and batches
of each first request, so the rounding the row claims can be checked.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.corpus import QUERY, model_dir, stage1_texts
from scoring.engine import CrossEncoderEngine, Scores
from worker.synthetic import SHAPES

ROOT = Path(__file__).parents[1]


def parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bge-reranker-v2-m3")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--pad-multiple", type=int, default=None, help="Default: the engine's for the device.")
    parser.add_argument("--attention", choices=("padded", "packed"), default="padded",
                        help="Batch widths exist only in padded attention: packed has none to round.")
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--docs", type=int, default=100, help="Stage-1 docs per request.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return parser


def main() -> None:
    """Time a fresh engine's first requests and the same requests again; append to a JSONL file."""
    args = parser().parse_args()

    cuda = args.device.startswith("cuda")
    sync = (lambda: torch.cuda.synchronize(args.device)) if cuda else (lambda: None)
    path = str(model_dir(args.shape))
    started = time.perf_counter()
    engine = CrossEncoderEngine.load(path, device=args.device, dtype=args.dtype, pad_multiple=args.pad_multiple, attention=args.attention)
    load_seconds = time.perf_counter() - started
    if cuda:  # a second of matrix products, so both settings start at the same clocks
        x = torch.randn(8192, 8192, device=args.device, dtype=torch.float16)
        until = time.perf_counter() + 1.0
        while time.perf_counter() < until:
            x @ x
        sync()
    corpora = [stage1_texts(args.docs, seed) for seed in range(100, 100 + args.requests)]

    def timed(passages: list[str]) -> tuple[float, Scores]:
        sync()
        begun = time.perf_counter()
        scores = engine.score(QUERY, passages)
        return round((time.perf_counter() - begun) * 1000, 1), scores

    first = [timed(c) for c in corpora]
    again = [timed(c) for c in corpora]
    row = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": torch.cuda.get_device_name(args.device) if cuda else "cpu",
        "torch": torch.__version__,
        "shape": args.shape,
        "dtype": engine.facts.dtype,
        "attention": engine.runner.layout.name,
        "pad_multiple": engine.runner.pad_multiple,
        "docs": args.docs,
        "load_and_warmup_s": round(load_seconds, 2),
        "padding_waste": round(statistics.mean(1 - s.tokens / s.padded_tokens for _, s in first), 4),
        "tokens": [s.tokens for _, s in first],
        "padded_tokens": [s.padded_tokens for _, s in first],
        "batches": [s.batches for _, s in first],
        "new_widths_ms": [t for t, _ in first],
        "same_again_ms": [t for t, _ in again],
        "new_widths_median_ms": statistics.median(t for t, _ in first),
        "same_again_median_ms": statistics.median(t for t, _ in again),
    }
    print(json.dumps(row))
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / f"fresh-shapes-{args.device.split(':')[0]}-{args.shape}.jsonl").open("a") as results:
        results.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
