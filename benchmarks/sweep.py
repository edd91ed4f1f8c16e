"""Sweep the engine's batch token budget: the evidence behind `max_batch_tokens` defaults.

    python -m benchmarks.sweep --shape bge-reranker-base --budgets 1024,2048,4096,8192,16384

Prints, per budget, the median time for 100 stage-1 docs, docs/s, batches and padding waste.
Writes benchmarks/results/sweep-<device>-<shape>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.corpus import QUERY, make_chunks, model_dir, stage1_texts
from benchmarks.run import median_seconds
from contract.formats import chunk_passage
from producer import Chunk
from scoring.engine import CrossEncoderEngine
from worker.synthetic import SHAPES

ROOT = Path(__file__).parents[1]


def main() -> None:
    """Time the engine on the same corpus at each budget, stage-1 docs and stage-2 chunks."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bge-reranker-base")
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budgets", default="1024,2048,4096,8192,16384")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--compile", default=None, metavar="MODE",
                        help="torch.compile the model first (default, reduce-overhead, max-autotune-no-cudagraphs, ...).")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    path = model_dir(args.shape)
    chunks = [Chunk.model_validate(c) for c in make_chunks(args.docs, seed=5)]
    corpora = {"docs": stage1_texts(args.docs), "chunks": [chunk_passage(c) for c in chunks]}
    engine = CrossEncoderEngine.load(str(path), device=args.device, dtype=args.dtype)
    reference = engine.score(QUERY, corpora["docs"]).logits
    compile_seconds = None
    if args.compile:
        started = time.perf_counter()
        engine.model = torch.compile(engine.model, mode=args.compile, dynamic=True)
        engine.warmup()
        compiled = engine.score(QUERY, corpora["docs"]).logits
        compile_seconds = time.perf_counter() - started
        drift = max(abs(a - b) for a, b in zip(compiled, reference))
        print(f"torch.compile(mode={args.compile!r}): {compile_seconds:.1f} s to compile and warm up; max |Δ logit| {drift:.2e}", flush=True)
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        engine.max_batch_tokens = budget
        for corpus, passages in corpora.items():
            last = {}

            def run() -> None:
                last["scores"] = engine.score(QUERY, passages)

            seconds, timings = median_seconds(run, args.repeats)
            scores = last["scores"]
            row = {
                "budget": budget, "corpus": corpus, "passages": len(passages), "seconds": seconds, "timings": timings,
                "per_s": len(passages) / seconds, "tokens": scores.tokens, "batches": scores.batches,
                "padding_waste": 1 - scores.tokens / scores.padded_tokens,
            }
            rows.append(row)
            print(f"budget {budget:>6}  {corpus:<6} {seconds * 1000:9.1f} ms  {row['per_s']:8.1f}/s  "
                  f"{scores.batches:3d} batches  padding {row['padding_waste']:.1%}", flush=True)
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"-compile-{args.compile}" if args.compile else ""
    target = args.out / f"sweep-{args.device.split(':')[0]}-{args.shape}{suffix}.json"
    target.write_text(json.dumps({
        "command": f"python -m benchmarks.sweep --shape {args.shape} --docs {args.docs} --repeats {args.repeats} "
                   f"--budgets {args.budgets} --device {args.device} --dtype {args.dtype}"
                   + (f" --compile {args.compile}" if args.compile else ""),
        "compile_seconds": compile_seconds,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": device, "dtype": str(engine.dtype), "rows": rows,
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
