"""Packed vs padded attention, each fusion on and off, tokenizing ahead or not: one corpus, one card.

    python -m benchmarks.attention --device cuda --shape bge-reranker-v2-m3 --docs 100 --repeats 7 --e2e
    python -m benchmarks.attention --device cpu --shape minilm --docs 20 --repeats 3 --only padded,packed

Every variant runs on the same loaded weights, so rows differ only in how the batch is laid out
and computed. Rows: the seed's simple loop (benchmarks/baselines.py), ours padded, ours packed,
packed with each fusion toggled, packed tokenizing up front or in slices of other sizes, and with
--e2e both attention settings through Redis and a real worker. Times are medians of --repeats
warm runs, in ms per 100 docs; the GEMM share counts the nominal linear-layer FLOPs of every token
against the dtype's measured GEMM peak on this card. Scores are compared with the seed loop in
fp32 (max |Δ| probability, Kendall τ, top-20 overlap), and packed rows with padded in the same dtype.
Writes <out>/attention-<device>-<shape>-<dtype>.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.baselines import SeedReranker
from benchmarks.corpus import (
    QUERY,
    cpu_features,
    cpu_name,
    model_dir,
    papers,
    stage1_texts,
)
from benchmarks.run import (
    gemm_peak_flops,
    kendall_tau,
    linear_flops_per_token,
    shape_of,
    top_overlap,
)
from scoring.engine import CrossEncoderEngine, Scores
from scoring.model import check_model, resolve_dtype
from scoring.packed import Fusions, PackedForward, flash_varlen_usable
from worker.synthetic import SHAPES

ROOT = Path(__file__).parents[1]


def variants(default_slice: int) -> dict[str, dict]:
    """Engine settings per row name: padded, packed, each fusion toggled against packed's defaults, tokenizing ahead or not."""
    rows = {"ours padded": {"attention": "padded"}, "ours packed": {"attention": "packed"}}
    defaults = Fusions()
    for field in dataclasses.fields(Fusions):
        on = not getattr(defaults, field.name)
        rows[f"packed {'+' if on else '-'} {field.name}"] = {"attention": "packed", "fusions": dataclasses.replace(defaults, **{field.name: on})}
    rows["packed + both compiled regions"] = {
        "attention": "packed", "fusions": dataclasses.replace(defaults, compile_add_norm=True, compile_bias_gelu=True)
    }
    # No commas in row names: --only splits on them.
    for size in sorted({0, 16, 32, 64} - {default_slice}):
        label = "tokenizing up front" if size == 0 else f"tokenizing in slices of {size}"
        rows[f"packed {label}"] = {"attention": "packed", "tokenize_slice": size}
    if default_slice:
        rows["padded tokenizing up front"] = {"attention": "padded", "tokenize_slice": 0}
    return rows


def timed(run: Callable[[], object], repeats: int, sync: Callable[[], None]) -> tuple[float, list[float], list[object]]:
    """Two untimed runs (compiled regions settle their shapes), then `repeats` timed ones; the median, all timings and results."""
    run()
    run()
    timings, results = [], []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        results.append(run())
        sync()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings), timings, results


def agreement(scores: list[float], reference: list[float]) -> dict:
    """Max |Δ| score, Kendall τ and top-20 overlap of `scores` against `reference`."""
    return {
        "max_abs_delta": max(abs(a - b) for a, b in zip(scores, reference)),
        "kendall_tau": kendall_tau(scores, reference),
        "top20_overlap": top_overlap(scores, reference),
    }


def engine_at(revision: str) -> type[CrossEncoderEngine]:
    """`CrossEncoderEngine` as worker/engine.py was at a git revision (for a before/after row)."""
    source = subprocess.run(["git", "show", f"{revision}:worker/engine.py"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "engine_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("engine_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.CrossEncoderEngine


def layout_of(engine: object) -> dict:
    """What an engine's batches really run through: its layout, and for packed its kernel and the encoder's fusions; its tokenizing slice."""
    runner = getattr(engine, "runner", None)
    if runner is None:  # an engine from another revision (--baseline-engine): padded, its own defaults
        return {"attention": "padded"}
    layout = runner.layout
    ran = {"attention": layout.name, "tokenize_slice": engine.tokenize_slice, "max_batch_tokens": engine.loop.scheduler.max_batch_tokens}
    if isinstance(layout, PackedForward):
        encoder = layout.encoder
        ran.update(kernel=layout.kernel, fusions=dataclasses.asdict(encoder.fusions), cuda_graphs=layout.graphed is not None,
                   fused_qkv_weights=all(layer.qkv is not None for layer in encoder.layers))
    return ran


def parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bge-reranker-v2-m3")
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto", help="auto: fp16 on CUDA, fp32 on CPU.")
    parser.add_argument("--only", default=None, help="Comma-separated row names (or prefixes) to run; default all.")
    parser.add_argument("--baseline-engine", default=None, metavar="REV",
                        help="Also time worker/engine.py as it was at this git revision (padded, its defaults).")
    parser.add_argument("--e2e", action="store_true", help="Also time padded and packed through Redis and a worker process.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return parser


def main() -> None:
    """Time every variant on one model and corpus; write JSON and Markdown."""
    args = parser().parse_args()

    cuda = args.device.startswith("cuda")
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    card = torch.cuda.get_device_name(device) if cuda else f"{cpu_name()} ({os.cpu_count()} cores, {cpu_features()})"
    dtype_name = args.dtype if args.dtype != "auto" else ("fp16" if cuda else "fp32")
    path = str(model_dir(args.shape))
    dims = shape_of(path)
    texts = stage1_texts(args.docs)
    torch_dtype = resolve_dtype(dtype_name, args.device)
    environment = {
        "card": card, "torch": torch.__version__, "cuda": torch.version.cuda, "torch_threads": torch.get_num_threads(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
        "flash_varlen_usable": flash_varlen_usable(device, torch_dtype, dims.hidden // dims.heads),
        "load_average_at_start": os.getloadavg(),
    }
    print(json.dumps(environment), flush=True)

    rows: dict[str, dict] = {}

    def record(name: str, seconds: float, timings: list[float], scores: list[float], extra: dict) -> None:
        per_100 = 100 / args.docs
        rows[name] = {
            "card": card, "dtype": dtype_name, "ms_per_100_docs": 1000 * seconds * per_100,
            "best_ms_per_100_docs": 1000 * min(timings) * per_100,
            "timings_ms": [round(1000 * t, 3) for t in timings], "scores": scores, **extra,
        }
        print(f"{name:<42} {1000 * seconds * per_100:9.1f} ms/100 docs  {json.dumps({k: v for k, v in extra.items() if k != 'info'})}", flush=True)

    def wanted(name: str) -> bool:
        return args.only is None or any(name.startswith(prefix) for prefix in args.only.split(","))

    reference = SeedReranker(Path(path), args.device, "fp32")
    reference_scores = reference.scores(QUERY, texts)
    del reference

    config, tokenizer = check_model(path)
    first = CrossEncoderEngine.load(path, device=args.device, dtype=dtype_name, attention="padded")
    model = first.runner.model
    tokens = sum(len(p.input_ids) for p in first.tokenize(QUERY, texts))
    peak = gemm_peak_flops(first.runner.dtype, dims.hidden, dims.intermediate, args.device)
    flops = linear_flops_per_token(dims) * tokens
    del first

    # Every row is built and warmed first, then timed in turns (row A, B, C, A, B, C, ...), so a
    # busy neighbour or a clock change costs every row alike rather than whichever ran then.
    runners: dict[str, Callable[[], object]] = {}
    details: dict[str, dict] = {}
    failed: dict[str, str] = {}
    if wanted("seed loop"):
        seed = SeedReranker(Path(path), args.device)
        runners[f"seed loop ({seed.dtype_name})"] = lambda: seed.scores(QUERY, texts)
    engines: dict[str, tuple[CrossEncoderEngine, dict]] = {}
    if args.baseline_engine and wanted("engine @"):
        name = f"engine @{args.baseline_engine} (padded)"
        try:  # the revision's engine may import modules this tree no longer has
            engines[name] = (engine_at(args.baseline_engine)(model, tokenizer, name=path, device=args.device), {})
        except Exception as e:  # noqa: BLE001
            failed[name] = f"{type(e).__name__}: {e}"
            print(f"{name}: FAILED {failed[name]}", flush=True)
    default_slice = CrossEncoderEngine.of(model, tokenizer, name=path, device=args.device).tokenize_slice
    for name, settings in variants(default_slice).items():
        if not wanted(name):
            continue
        # One row failing (a compiler missing on the device, say) must not cost the other rows.
        try:
            engines[name] = (CrossEncoderEngine.of(model, tokenizer, name=path, device=args.device, **settings), settings)
        except Exception as e:  # noqa: BLE001
            failed[name] = f"{type(e).__name__}: {e}"
            print(f"{name}: FAILED {failed[name]}", flush=True)
    for name, (engine, settings) in engines.items():
        runners[name] = lambda engine=engine: engine.score(QUERY, texts)
        details[name] = {"settings": {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in settings.items()}}
    for name in list(runners):
        try:
            started = time.perf_counter()
            if name in engines:
                engines[name][0].warmup()
            # Two untimed runs: compiled regions settle their shapes, allocators their pools.
            runners[name]()
            runners[name]()
            details.setdefault(name, {})["warmup_s"] = time.perf_counter() - started
        except Exception as e:  # noqa: BLE001
            failed[name] = f"{type(e).__name__}: {e}"
            print(f"{name}: FAILED {failed[name]}", flush=True)
            del runners[name]
    timings: dict[str, list[float]] = {name: [] for name in runners}
    results: dict[str, list[object]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, run in runners.items():
            sync()
            started = time.perf_counter()
            results[name].append(run())
            sync()
            timings[name].append(time.perf_counter() - started)
    peak = max(peak, gemm_peak_flops(torch_dtype, dims.hidden, dims.intermediate, args.device))
    for name in runners:
        seconds = statistics.median(timings[name])
        last = results[name][-1]
        if hasattr(last, "probabilities"):  # an engine's Scores (the baseline engine has its own class)
            scores: list[Scores] = results[name]
            ran = layout_of(engines[name][0])
            extra = {
                "attention": ran["attention"], "ran": ran,
                "tokenize_ms": statistics.median(1000 * s.tokenize_seconds for s in scores) * 100 / args.docs,
                "forward_ms": statistics.median(1000 * s.forward_seconds for s in scores) * 100 / args.docs,
                "batches": last.batches, "tokens": last.tokens, "padded_tokens": last.padded_tokens,
                "gemm_peak_share": flops / seconds / peak, **details[name],
            }
            record(name, seconds, timings[name], last.probabilities, extra)
        else:
            record(name, seconds, timings[name], last, {"padded_tokens": seed.padded_tokens, **details[name]})
    del runners, engines, model
    if cuda:
        torch.cuda.empty_cache()
    environment["failed_rows"] = failed
    write(args, environment, rows, {}, reference_scores, tokens, peak)
    if args.e2e:
        try:
            queue = measure_end_to_end(Path(path), args, dtype_name, card)
        except Exception as e:  # noqa: BLE001
            queue = {"failed": f"{type(e).__name__}: {e}"}
            print(f"end to end: FAILED {queue['failed']}", flush=True)
        write(args, environment, rows, queue, reference_scores, tokens, peak)


def measure_end_to_end(path: Path, args: argparse.Namespace, dtype: str, card: str) -> dict:
    """Padded and packed through a private Redis and one real worker process (prefork, concurrency 1)."""
    from benchmarks.through_redis import running_system

    if shutil.which("redis-server") is None:
        print("no redis-server on PATH: skipping the end-to-end rows", flush=True)
        return {"skipped": "no redis-server on PATH"}
    candidates = papers(args.docs)
    out = {}
    for attention in ("padded", "packed"):
        os.environ["RERANK_ATTENTION"] = attention
        with running_system(path, args.device, dtype, None) as client:
            client.rerank_documents(QUERY, candidates[:8], top_k=8, timeout=600)
            seconds, timings, results = timed(lambda: client.rerank_documents(QUERY, candidates, top_k=20, timeout=600), args.repeats, lambda: None)
            info = results[-1].info
            out[f"via Redis + worker, {attention}"] = {
                "card": card, "dtype": dtype, "attention": info.attention, "ms_per_100_docs": 1000 * seconds * 100 / args.docs,
                "timings_ms": [round(1000 * t, 3) for t in timings],
                "tokenize_ms": info.tokenize_ms * 100 / args.docs, "forward_ms": info.forward_ms * 100 / args.docs,
            }
            print(f"via Redis + worker, {attention}: {1000 * seconds * 100 / args.docs:.1f} ms/100 docs (worker says {info.attention})", flush=True)
    os.environ.pop("RERANK_ATTENTION", None)
    return out


def write(args: argparse.Namespace, environment: dict, rows: dict, queue: dict, reference: list[float], tokens: int, peak: float) -> None:
    """Add agreement columns and write <out>/attention-<device>-<shape>-<dtype>.json and .md."""
    padded = rows.get("ours padded", {}).get("scores")
    for row in rows.values():
        row["vs_fp32_loop"] = agreement(row["scores"], reference)
        if padded is not None and row.get("attention") == "packed":
            row["vs_padded_same_dtype"] = agreement(row["scores"], padded)
    dtype = next(iter(rows.values()))["dtype"] if rows else args.dtype
    stem = f"attention-{torch.device(args.device).type}-{args.shape}-{dtype}"
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": f"python -m benchmarks.attention --device {args.device} --shape {args.shape} --docs {args.docs} "
        f"--repeats {args.repeats} --dtype {args.dtype}" + (f" --only {args.only}" if args.only else "")
        + (f" --baseline-engine {args.baseline_engine}" if args.baseline_engine else "") + (" --e2e" if args.e2e else ""),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "environment": environment, "shape": args.shape, "docs": args.docs,
        "tokens": tokens, "gemm_peak_tflops": peak / 1e12, "rows": rows, "end_to_end": queue,
        "load_average_at_end": os.getloadavg(),
    }
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    cell = lambda value, fmt: "–" if value is None else format(value, fmt)  # noqa: E731
    lines = [
        f"Card: {environment['card']}; torch {environment['torch']}; variable-length FlashAttention usable: "
        f"{environment['flash_varlen_usable']}. Random weights, {args.shape} shape, {dtype}. {args.docs} stage-1 docs, {tokens} tokens. "
        f"Median (and best) of {args.repeats} warm runs, rows timed in turns. {dtype} GEMM peak {peak / 1e12:.1f} TFLOP/s (card above).",
        "",
        "| row | card | ms / 100 docs | best | tokenize ms | forward ms | batches | padded tokens | GEMM peak share | "
        "max abs Δ vs fp32 loop | τ vs fp32 loop | top-20 vs fp32 loop | τ vs padded | top-20 vs padded |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        ref, pad = row["vs_fp32_loop"], row.get("vs_padded_same_dtype", {})
        lines.append(
            f"| {name} | {row['card']} | {row['ms_per_100_docs']:.1f} | {row['best_ms_per_100_docs']:.1f} | {cell(row.get('tokenize_ms'), '.1f')} | "
            f"{cell(row.get('forward_ms'), '.1f')} | {cell(row.get('batches'), 'd')} | {cell(row.get('padded_tokens'), ',d')} | "
            f"{cell(row.get('gemm_peak_share'), '.0%')} | {ref['max_abs_delta']:.1e} | {ref['kendall_tau']:.3f} | "
            f"{ref['top20_overlap']:.0%} | {cell(pad.get('kendall_tau'), '.3f')} | {cell(pad.get('top20_overlap'), '.0%')} |"
        )
    for name, row in queue.items():
        if isinstance(row, dict):
            lines.append(
                f"| {name} (worker reports {row['attention']}) | {row['card']} | {row['ms_per_100_docs']:.1f} | "
                f"{min(row['timings_ms']) * 100 / args.docs:.1f} | {row['tokenize_ms']:.1f} | {row['forward_ms']:.1f} | – | – | – | – | – | – | – | – |"
            )
    lines += [f"Failed: {name}: {error}" for name, error in environment.get("failed_rows", {}).items()]
    lines += [f"End to end {key}: {queue[key]}" for key in ("failed", "skipped") if key in queue]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
