"""Benchmark: ours vs the seed vs sentence-transformers, side by side in one run.

    python -m benchmarks.run --shape bge-reranker-base --docs 100 --repeats 3

Writes <out>/<device>-<shape>.json and .md (benchmarks/results), and <plots>/benchmark-<device>-<shape>.png
(docs). Without sentence-transformers or matplotlib (the `bench` extra), their row or the plot is
skipped and the results say so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig

from benchmarks.baselines import SeedReranker, SentenceTransformersReranker
from benchmarks.corpus import QUERY, cpu_features, cpu_name, model_dir
from benchmarks.corpus import papers as make_papers
from benchmarks.through_redis import running_system
from contract.formats import document_passage
from producer import Candidate, DocumentsRequest
from scoring.engine import CrossEncoderEngine
from scoring.runner import DEFAULT_BATCH_TOKENS
from worker.ranking import rank_documents
from worker.synthetic import SHAPES, Shape

ROOT = Path(__file__).parents[1]


def median_seconds(run: Callable[[], object], repeats: int, warmup: Callable[[], object] | None = None) -> tuple[float, list[float]]:
    """Warm up (with `warmup`, else one untimed run), then `repeats` timed runs; return the median and all timings."""
    (warmup or run)()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings), timings


def gemm_peak_flops(dtype: torch.dtype, hidden: int, intermediate: int, device: str = "cpu") -> float:
    """Best FLOP/s of the model's largest linear layer (x @ W.T, as nn.Linear) on one default batch of tokens.

    The output is preallocated: a fresh result per call would time page faults, not the GEMM.
    """
    rows = DEFAULT_BATCH_TOKENS[torch.device(device).type]
    x = torch.randn(rows, hidden, dtype=dtype, device=device)
    weight = torch.randn(intermediate, hidden, dtype=dtype, device=device)
    out = torch.empty(rows, intermediate, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        torch.matmul(x, weight.t(), out=out)
        sync()
        best = float("inf")
        for _ in range(10):
            started = time.perf_counter()
            torch.matmul(x, weight.t(), out=out)
            sync()
            best = min(best, time.perf_counter() - started)
    return 2 * rows * hidden * intermediate / best


def shape_of(model: str | Path) -> Shape:
    """The transformer dimensions in a model's config."""
    config = AutoConfig.from_pretrained(str(model))
    return Shape(config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size)


def timing_row(
    role: str, seconds: float, timings: list[float], docs: int, tokens: int, padded: int | None, flops_per_token: float, peak: float,
    scores: list[float] | None = None,
) -> dict:
    """One implementation's figures; the GEMM peak share is against the main dtype's peak, so rows compare on one scale."""
    return {
        "role": role,
        "docs": docs,
        "seconds": seconds,
        "timings": timings,
        "docs_per_s": docs / seconds,
        "tokens_per_s": tokens / seconds,
        "padded_tokens": padded,
        "padding_waste": None if padded is None else 1 - tokens / padded,
        "gemm_peak_share": flops_per_token * tokens / seconds / peak,
        "scores": scores,
    }


def linear_flops_per_token(shape: Shape) -> float:
    """Multiply-add FLOPs of the encoder's linear layers for one token (attention scores excluded)."""
    return 2 * shape.layers * (4 * shape.hidden * shape.hidden + 2 * shape.hidden * shape.intermediate)


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-a between two score lists (n is small: O(n^2) is fine)."""
    n = len(a)
    concordant = sum(
        1 if (a[i] - a[j]) * (b[i] - b[j]) > 0 else -1 if (a[i] - a[j]) * (b[i] - b[j]) < 0 else 0
        for i in range(n) for j in range(i + 1, n)
    )
    return concordant / (n * (n - 1) / 2)


def top_overlap(a: list[float], b: list[float], k: int = 20) -> float:
    """Share of the top-k by `a` that is also in the top-k by `b`."""
    top = lambda s: set(sorted(range(len(s)), key=lambda i: -s[i])[:k])  # noqa: E731
    return len(top(a) & top(b)) / min(k, len(a))


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bge-reranker-base")
    parser.add_argument("--model", default=None, help="A real model (hub id or directory) instead of a random-weight --shape.")
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="Default: the engine's default for the device.")
    parser.add_argument("--bf16-docs", type=int, default=100, help="Docs for the bf16 run (slow on CPUs without bf16 units).")
    parser.add_argument("--skip-e2e", action="store_true", help="Skip the runs through Redis and a worker process.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N; GPU figures go to their own results file.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--plots", type=Path, default=ROOT / "docs", help="Where the docs/s bar chart goes.")
    return parser


def main() -> None:
    """Run every implementation on the same model and corpus and write the results."""
    args = parser().parse_args()
    path = args.model or model_dir(args.shape)
    dims = shape_of(path)
    args.label = args.shape if args.model is None else Path(str(args.model).rstrip("/")).name
    args.model_note = f"random weights, {args.shape} shape" if args.model is None else f"{args.model} (its own weights)"
    papers = make_papers(args.docs)
    documents = [document_passage(p) for p in papers]
    request = DocumentsRequest(query=QUERY, candidates=papers, top_k=20)
    flags = cpu_flags()
    cuda = args.device.startswith("cuda")
    device = {
        "device": args.device.split(":")[0],
        "name": torch.cuda.get_device_name(args.device) if cuda else "cpu",
        "cpu": f"{cpu_name()} ({cpu_features()})",
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}),
    }
    device["load_average_at_start"] = os.getloadavg()
    print(f"device: {device}", flush=True)

    # CPU: fp32 is the default and bf16 the option; CUDA: fp16 is the default and bf16 the option.
    main_dtype, alt_dtype = ("fp16", "bf16") if cuda else ("fp32", "bf16")
    ours = CrossEncoderEngine.load(str(path), device=args.device, dtype=main_dtype, max_batch_tokens=args.max_batch_tokens)
    pairs = ours.tokenize(QUERY, documents)
    tokens = sum(len(p.input_ids) for p in pairs)
    peak = gemm_peak_flops(ours.runner.dtype, dims.hidden, dims.intermediate, args.device)
    device["gemm_dtype"] = main_dtype
    print(f"{args.docs} docs, {tokens} tokens; {main_dtype} GEMM peak {peak / 1e9:.1f} GFLOP/s", flush=True)

    rows: dict[str, dict] = {}

    def record(
        name: str, role: str, seconds: float, timings: list[float], scores: list[float] | None, padded: int | None,
        docs: int = args.docs, tokens_in_run: int = tokens,
    ) -> None:
        rows[name] = timing_row(role, seconds, timings, docs, tokens_in_run, padded, linear_flops_per_token(dims), peak, scores)
        print(f"{name:<32} {seconds:8.3f} s  {docs / seconds:8.2f} docs/s", flush=True)

    seed = SeedReranker(path, args.device)
    seconds, timings = median_seconds(lambda: seed.scores(QUERY, documents), args.repeats, lambda: seed.scores(QUERY, documents[:8]))
    record(f"seed ({seed.dtype_name})", "seed", seconds, timings, seed.scores(QUERY, documents), seed.padded_tokens)
    # Score agreement is always measured against the seed's algorithm in fp32 (on a GPU the seed runs fp16).
    reference = rows[f"seed ({seed.dtype_name})"]["scores"] if not cuda else SeedReranker(path, args.device, "fp32").scores(QUERY, documents)
    del seed

    skipped: dict[str, str] = {}
    try:
        st = SentenceTransformersReranker(path, args.device)
    except ImportError as e:
        skipped["sentence-transformers (fp32)"] = f"sentence-transformers is not installed ({e}); pip install -e '.[bench]'"
        print(f"skipping sentence-transformers (fp32): {skipped['sentence-transformers (fp32)']}", flush=True)
    else:
        seconds, timings = median_seconds(lambda: st.scores(QUERY, documents), args.repeats, lambda: st.scores(QUERY, documents[:8]))
        record("sentence-transformers (fp32)", "st", seconds, timings, st.scores(QUERY, documents), None)
        del st

    warm = DocumentsRequest(query=QUERY, candidates=papers[:8], top_k=8)
    seconds, timings = median_seconds(lambda: rank_documents(ours, request), args.repeats, lambda: rank_documents(ours, warm))
    result = rank_documents(ours, request)
    record(f"ours in-process ({main_dtype})", "ours", seconds, timings, ours.score(QUERY, documents).probabilities, result.info.padded_tokens)
    rows[f"ours in-process ({main_dtype})"].update(tokenize_ms=result.info.tokenize_ms, forward_ms=result.info.forward_ms, ran=ran(ours),
                                                       batches=result.info.batches)
    print(f"  of which tokenize {result.info.tokenize_ms:.1f} ms, forward {result.info.forward_ms:.1f} ms", flush=True)
    del ours

    # The option: timed the same way, on fewer docs where the CPU lacks bf16 units and it would take long.
    alt_docs = documents[: args.bf16_docs]
    alt = CrossEncoderEngine.load(str(path), device=args.device, dtype=alt_dtype, max_batch_tokens=args.max_batch_tokens)
    last = {}

    def run_alt() -> None:
        last["scores"] = alt.score(QUERY, alt_docs)

    seconds, timings = median_seconds(run_alt, args.repeats, lambda: alt.score(QUERY, alt_docs[:8]))
    alt_tokens = last["scores"].tokens
    record(f"ours in-process ({alt_dtype})", "alt", seconds, timings, last["scores"].probabilities, last["scores"].padded_tokens,
           docs=len(alt_docs), tokens_in_run=alt_tokens)
    rows[f"ours in-process ({alt_dtype})"].update(ran=ran(alt), batches=last["scores"].batches)
    rows[f"ours in-process ({alt_dtype})"]["note"] = (
        f"{len(alt_docs)} docs" + ("" if cuda or device["native_bf16"] else "; this CPU has no native bf16 (AVX512-BF16/AMX)")
    )
    alt_peak = gemm_peak_flops(alt.runner.dtype, dims.hidden, dims.intermediate, args.device)
    device["gemm_peak_gflops_alt"] = alt_peak / 1e9
    print(f"{alt_dtype} GEMM peak {alt_peak / 1e9:.1f} GFLOP/s", flush=True)
    del alt

    queue: dict = {}
    if not args.skip_e2e:
        queue = measure_end_to_end(path, papers, args, rows, tokens, linear_flops_per_token(dims), peak, main_dtype)

    write_results(args, device, tokens, peak, rows, queue, reference, skipped)


def ran(engine: CrossEncoderEngine) -> dict:
    """What an engine really computes with: its weights' dtype, its layout, the budget its scheduler plans with."""
    return {"dtype": str(engine.runner.dtype).removeprefix("torch."), "attention": engine.runner.layout.name,
            "max_batch_tokens": engine.loop.scheduler.max_batch_tokens}


def measure_end_to_end(
    path: Path, papers: list[Candidate], args: argparse.Namespace, rows: dict, tokens: int, flops_per_token: float, peak: float,
    dtype: str,
) -> dict:
    """Time stage 1 and the two-stage chain through Redis and a worker; measure the queue's overhead."""
    with running_system(path, args.device, dtype, args.max_batch_tokens) as client:
        last = {}

        def stage1() -> None:
            last["result"] = client.rerank_documents(QUERY, papers, top_k=20, timeout=1800)

        seconds, timings = median_seconds(stage1, args.repeats, lambda: client.rerank_documents(QUERY, papers[:8], top_k=8, timeout=600))
        info = last["result"].info
        rows[f"ours via Redis + worker ({dtype})"] = timing_row(
            "e2e", seconds, timings, args.docs, tokens, info.padded_tokens, flops_per_token, peak
        )
        rows[f"ours via Redis + worker ({dtype})"]["ran"] = {
            "dtype": info.dtype, "attention": info.attention, "worker": info.worker, "pid": info.pid, "batches": info.batches,
        }
        print(f"{'ours via Redis + worker':<28} {seconds:8.2f} s  {args.docs / seconds:7.2f} docs/s", flush=True)

        added = []
        for _ in range(30):
            started = time.perf_counter()
            small = client.rerank_documents(QUERY, papers[:1], top_k=1, timeout=60)
            added.append(time.perf_counter() - started - (small.info.tokenize_ms + small.info.forward_ms) / 1000)
        added.sort()
        floor = []
        for _ in range(30):
            started = time.perf_counter()
            client.app.send_task("bench.noop", args=(1,), queue=client.settings.queue).get(timeout=60)
            floor.append(time.perf_counter() - started)
        floor.sort()

        chain_papers = papers
        chain_runs = []
        for _ in range(max(1, args.repeats - 1)):
            started = time.perf_counter()
            both = client.two_stage(QUERY, chain_papers, top_k_docs=20, timeout=3600)
            wall = time.perf_counter() - started
            compute = sum((r.info.tokenize_ms + r.info.forward_ms) / 1000 for r in (both.documents, both.chunks))
            chain_runs.append({"wall_s": wall, "compute_s": compute, "ratio": wall / compute, "chunks": both.chunks.scored})
            print(f"two-stage chain: {wall:.2f} s wall, {compute:.2f} s compute, ratio {wall / compute:.3f}", flush=True)
    return {
        "added_latency_ms": {"p50": 1000 * added[len(added) // 2], "p90": 1000 * added[int(len(added) * 0.9)], "samples": len(added)},
        "celery_noop_round_trip_ms": {"p50": 1000 * floor[len(floor) // 2], "p90": 1000 * floor[int(len(floor) * 0.9)], "samples": len(floor)},
        "chain": chain_runs,
    }


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run."""
    model = f"--model {args.model}" if args.model else f"--shape {args.shape}"
    parts = ["python -m benchmarks.run", model, f"--docs {args.docs}", f"--repeats {args.repeats}", f"--bf16-docs {args.bf16_docs}"]
    if args.max_batch_tokens:
        parts.append(f"--max-batch-tokens {args.max_batch_tokens}")
    if args.skip_e2e:
        parts.append("--skip-e2e")
    if args.device != "cpu":
        parts.append(f"--device {args.device}")
    return " ".join(parts)


def write_results(
    args: argparse.Namespace, device: dict, tokens: int, peak: float, rows: dict, queue: dict, reference: list[float],
    skipped: dict[str, str],
) -> None:
    """Write JSON and a Markdown table, and plot docs/s per implementation (rows and plot skipped say why)."""
    by_role = {row["role"]: row for row in rows.values()}
    seed, st = by_role["seed"], by_role.get("st")
    for name, row in rows.items():
        row["vs_seed"] = row["docs_per_s"] / seed["docs_per_s"]
        row["vs_sentence_transformers"] = row["docs_per_s"] / st["docs_per_s"] if st else None
        if row.get("scores") is not None:
            expected = reference[: len(row["scores"])]
            row["max_abs_delta_vs_seed_fp32"] = max(abs(a - b) for a, b in zip(row["scores"], expected))
            row["kendall_tau_vs_seed_fp32"] = kendall_tau(row["scores"], expected)
            row["top20_overlap_vs_seed_fp32"] = top_overlap(row["scores"], expected)
    if "e2e" in by_role:
        queue["throughput_share_vs_in_process"] = by_role["e2e"]["docs_per_s"] / by_role["ours"]["docs_per_s"]

    stem = f"{device['device']}-{args.label}"
    where = device["name"] if device["device"] == "cuda" else f"{device['cores']}-core CPU"
    plotted = plot(rows, args.plots / f"benchmark-{stem}.png", f"{args.label}, {args.docs} docs, {where}")
    if plotted is not None:
        skipped["plot"] = plotted
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command_line(args),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_at_end": os.getloadavg(),
        "device": device, "shape": args.shape, "model": args.model_note, "docs": args.docs, "tokens": tokens,
        "gemm_peak_gflops_fp32": peak / 1e9, "implementations": rows, "queue": queue, "skipped": skipped,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")

    lines = [
        f"Device: {device['name']} ({device['cpu']}, {device['cores']} cores), torch {device['torch']} ({device['isa']}, "
        f"native bf16: {'yes' if device['native_bf16'] else 'no'}). Model: {args.model_note}. "
        f"{args.docs} stage-1 docs, {tokens} tokens. Median of {args.repeats} warm runs. "
        f"{device['gemm_dtype']} GEMM peak {peak / 1e9:.1f} GFLOP/s.",
        "",
        "| implementation | docs/s | tokens/s | vs seed | vs sentence-transformers | padding waste | GEMM peak share | max abs Δ score vs seed fp32 | Kendall τ | top-20 overlap |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        cell = lambda key, fmt: "–" if row.get(key) is None else format(row[key], fmt)  # noqa: E731
        lines.append(
            f"| {name} | {row['docs_per_s']:.2f} | {cell('tokens_per_s', ',.0f')} | {row['vs_seed']:.2f}× | "
            f"{'–' if row['vs_sentence_transformers'] is None else format(row['vs_sentence_transformers'], '.2f') + '×'} | {cell('padding_waste', '.1%')} | {cell('gemm_peak_share', '.0%')} | "
            f"{cell('max_abs_delta_vs_seed_fp32', '.1e')} | {cell('kendall_tau_vs_seed_fp32', '.3f')} | {cell('top20_overlap_vs_seed_fp32', '.0%')} |"
        )
    alt = by_role["alt"]
    lines.append("")
    lines.append(
        f"{alt_name(rows)}: {alt['note']}; its own GEMM peak is {device['gemm_peak_gflops_alt']:.1f} GFLOP/s "
        f"(the GEMM peak share column uses the {device['gemm_dtype']} peak)."
    )
    if queue:
        added = queue["added_latency_ms"]
        lines.append(
            f"Queue: added latency p50 {added['p50']:.1f} ms, p90 {added['p90']:.1f} ms (1-doc tasks, {added['samples']} samples; "
            f"a no-op Celery task's round trip on the same worker: p50 {queue['celery_noop_round_trip_ms']['p50']:.1f} ms, "
            f"p90 {queue['celery_noop_round_trip_ms']['p90']:.1f} ms); "
            f"{args.docs}-doc throughput through Redis = {queue['throughput_share_vs_in_process']:.1%} of in-process."
        )
        for run in queue["chain"]:
            lines.append(
                f"Two-stage chain: {run['wall_s']:.2f} s wall for {run['compute_s']:.2f} s of stage-1 + stage-2 compute "
                f"({run['chunks']} chunks): {run['ratio']:.3f}×."
            )
    lines += [f"Skipped {name}: {why}." for name, why in skipped.items()]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def alt_name(rows: dict) -> str:
    """The row name of the reduced-precision option."""
    return next(name for name, row in rows.items() if row["role"] == "alt")


def plot(rows: dict, target: Path, title: str) -> str | None:
    """Bar chart of docs/s per implementation at `target`; without matplotlib, none, and the reason why."""
    try:
        import matplotlib
    except ImportError as e:
        print(f"skipping the plot: {e}; pip install -e '.[bench]'", flush=True)
        return f"matplotlib is not installed ({e}); pip install -e '.[bench]'"

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    values = [rows[n]["docs_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh(names[::-1], values[::-1], color="#4472c4")
    for y, value in enumerate(values[::-1]):
        ax.text(value, y, f" {value:.2f}", va="center")
    ax.set_xlabel("documents per second (higher is better)")
    ax.set_title(title)
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    return None


if __name__ == "__main__":
    main()
