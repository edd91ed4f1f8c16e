"""Sweep the engine's batch token budget: the evidence behind `max_batch_tokens` defaults.

    python -m benchmarks.sweep --shape bge-reranker-base --budgets 1024,2048,4096,8192,16384
    python -m benchmarks.sweep --shape tiny --docs 8 --repeats 1 --budgets 256,1024 --compile default --compile-backend eager

Loads the model once, then builds one engine per budget over the same weights, so rows differ
only in the budget their scheduler plans with. Prints, per budget, the median time for the
stage-1 docs and the stage-2 chunks, docs/s, the batches and tokens actually run, and padding
waste. With --compile, the module each engine's layout calls (the Hugging Face model for padded
attention, the packed encoder for packed) is compiled, and every row records how many of its
calls ran a compiled graph. Writes <out>/sweep-<device>-<shape>[-compile-<mode>].json.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.corpus import QUERY, make_chunks, model_dir, stage1_texts
from benchmarks.run import median_seconds
from contract.formats import chunk_passage
from producer import Chunk
from scoring.engine import CrossEncoderEngine
from scoring.layouts import PaddedForward
from scoring.model import check_model
from scoring.packed import PackedForward
from worker.synthetic import SHAPES

ROOT = Path(__file__).parents[1]


class Compiled:
    """Stands in for the module a layout calls: runs its compiled form, counts the calls, lends the module's attributes."""

    def __init__(self, module: Any, compiled: Callable[..., Any]) -> None:
        """Wrap `module` and its `torch.compile`d form."""
        self.module = module
        self.compiled = compiled
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the compiled form."""
        self.calls += 1
        return self.compiled(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)


def counting_backend(backend: str, mode: str, graph_calls: collections.Counter) -> Callable[..., Any]:
    """A torch.compile backend: `backend` (with `mode`, as torch.compile would build it) whose compiled graphs count their runs."""
    if backend == "inductor":
        inner = torch._TorchCompileInductorWrapper(mode, None, True)
    else:
        inner = torch._TorchCompileWrapper(backend, mode, None, True)

    def compile_graph(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        compiled = inner(graph, example_inputs)

        def run(*args: Any) -> Any:
            graph_calls["runs"] += 1
            return compiled(*args)

        graph_calls["graphs"] += 1
        return run

    return compile_graph


def compile_layout(engine: CrossEncoderEngine, backend: Callable[..., Any]) -> Compiled:
    """Compile what `engine`'s layout runs each batch through (padded: the HF model; packed: the packed encoder) and put it in place."""
    layout = engine.runner.layout
    if isinstance(layout, PaddedForward):
        layout.model = Compiled(layout.model, torch.compile(layout.model, backend=backend, dynamic=True))
        return layout.model
    if isinstance(layout, PackedForward) and layout.graphed is None:
        layout.encoder = Compiled(layout.encoder, torch.compile(layout.encoder.__call__, backend=backend, dynamic=True))
        return layout.encoder
    raise SystemExit(f"--compile: no compilable module in a {type(layout).__name__} layout")


def parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bge-reranker-base")
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budgets", default="1024,2048,4096,8192,16384")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--attention", choices=("packed", "padded"), default=None, help="Default: the engine's for the device.")
    parser.add_argument("--compile", default=None, metavar="MODE",
                        help="torch.compile what the layout runs first (default, reduce-overhead, max-autotune-no-cudagraphs, ...).")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile (eager: seconds, for a dry run).")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return parser


def main() -> None:
    """Time one engine per budget on the same weights and corpus, stage-1 docs and stage-2 chunks."""
    args = parser().parse_args()
    path = model_dir(args.shape)
    chunks = [Chunk.model_validate(c) for c in make_chunks(args.docs, seed=5)]
    corpora = {"docs": stage1_texts(args.docs), "chunks": [chunk_passage(c) for c in chunks]}
    loaded = CrossEncoderEngine.load(str(path), device=args.device, dtype=args.dtype, attention=args.attention)
    _, tokenizer = check_model(str(path))
    model, attention = loaded.runner.model, loaded.runner.attention
    reference = loaded.score(QUERY, corpora["docs"]).logits
    del loaded
    graph_calls: collections.Counter = collections.Counter()
    backend = counting_backend(args.compile_backend, args.compile, graph_calls) if args.compile else None
    compiled: dict[str, Any] = {}
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        engine = CrossEncoderEngine.of(model, tokenizer, name=str(path), device=args.device, max_batch_tokens=budget, attention=attention)
        wrapper = None
        if backend is not None:
            started = time.perf_counter()
            wrapper = compile_layout(engine, backend)
            logits = engine.score(QUERY, corpora["docs"]).logits
            compiled.setdefault("seconds", time.perf_counter() - started)
            compiled["target"] = f"{type(engine.runner.layout).__name__}: {type(wrapper.module).__name__}"
            compiled["max_abs_logit_delta"] = max(compiled.get("max_abs_logit_delta", 0.0), max(abs(a - b) for a, b in zip(logits, reference)))
            print(f"torch.compile(mode={args.compile!r}, backend={args.compile_backend!r}) of {compiled['target']}: "
                  f"max |Δ logit| {compiled['max_abs_logit_delta']:.2e}", flush=True)
        for corpus, passages in corpora.items():
            rows.append(time_row(engine, budget, corpus, passages, args.repeats, wrapper, graph_calls))
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"-compile-{args.compile}" if args.compile else ""
    target = args.out / f"sweep-{args.device.split(':')[0]}-{args.shape}{suffix}.json"
    target.write_text(json.dumps({
        "command": f"python -m benchmarks.sweep --shape {args.shape} --docs {args.docs} --repeats {args.repeats} "
                   f"--budgets {args.budgets} --device {args.device} --dtype {args.dtype}"
                   + (f" --attention {args.attention}" if args.attention else "")
                   + (f" --compile {args.compile} --compile-backend {args.compile_backend}" if args.compile else ""),
        "compile": {"mode": args.compile, "backend": args.compile_backend, **compiled, "graphs_compiled": graph_calls["graphs"]}
        if args.compile else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": device, "dtype": str(model.dtype), "attention": attention, "rows": rows,
    }, indent=1) + "\n")


def time_row(
    engine: CrossEncoderEngine, budget: int, corpus: str, passages: list[str], repeats: int, wrapper: Compiled | None,
    graph_calls: collections.Counter,
) -> dict[str, Any]:
    """Time `engine` on `passages`; the row, with what ran: the budget its scheduler planned with, batches, tokens, compiled calls."""
    last = {}
    calls, runs = (wrapper.calls if wrapper else 0), graph_calls["runs"]

    def run() -> None:
        last["scores"] = engine.score(QUERY, passages)

    seconds, timings = median_seconds(run, repeats)
    scores = last["scores"]
    row = {
        "budget": budget, "scheduler_budget": engine.loop.scheduler.max_batch_tokens, "attention": engine.runner.layout.name,
        "corpus": corpus, "passages": len(passages), "seconds": seconds, "timings": timings,
        "per_s": len(passages) / seconds, "tokens": scores.tokens, "padded_tokens": scores.padded_tokens, "batches": scores.batches,
        "padding_waste": 1 - scores.tokens / scores.padded_tokens,
    }
    if wrapper is not None:
        # Over the warm-up and timed runs: a call that ran no compiled graph fell back to eager.
        row["compiled_module_calls"] = wrapper.calls - calls
        row["compiled_graph_runs"] = graph_calls["runs"] - runs
    rows_note = f"  compiled graph runs {row['compiled_graph_runs']}/{row['compiled_module_calls']} calls" if wrapper else ""
    print(f"budget {budget:>6}  {corpus:<6} {seconds * 1000:9.1f} ms  {row['per_s']:8.1f}/s  "
          f"{scores.batches:3d} batches  padding {row['padding_waste']:.1%}{rows_note}", flush=True)
    return row


if __name__ == "__main__":
    main()
