"""Where one 100-doc forward spends its time: a torch.profiler summary, so the next step is chosen from a profile.

    python -m benchmarks.profile_forward --device cuda --shape bge-reranker-v2-m3
    python -m benchmarks.profile_forward --device cpu --shape tiny --docs 20      # dry run

Profiles one warm `score()` of `--docs` stage-1 passages (packed attention where it runs) and writes
the top operators by self time on the device (CUDA) or CPU, with their call counts, to
<out>/profile-<device>-<shape>.md (benchmarks/results), plus the kernel launch count: the figure a
CUDA graph would remove; and every operator's call count and self time to
profile-<device>-<shape>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.corpus import QUERY, cpu_name, model_dir, stage1_texts
from scoring.engine import CrossEncoderEngine

ROOT = Path(__file__).parents[1]


def parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return parser


def main() -> None:
    """Profile one warm forward and write the summary."""
    args = parser().parse_args()
    engine = CrossEncoderEngine.load(str(model_dir(args.shape)), device=args.device)
    passages = stage1_texts(args.docs)
    for _ in range(3):
        engine.score(QUERY, passages)
    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        scores = engine.score(QUERY, passages)
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    card = torch.cuda.get_device_name(0) if cuda else cpu_name()
    text = "\n".join([
        f"# Profile of one forward: {args.docs} stage-1 docs, {args.shape} shape, {engine.runner.layout.name} attention, {card}",
        "",
        f"torch {torch.__version__}; {scores.tokens} tokens in {scores.batches} batches; kernel launches: {launches}.",
        "Command: `python -m benchmarks.profile_forward " + f"--device {args.device} --shape {args.shape} --docs {args.docs}`",
        "",
        "```text",
        events.table(sort_by=sort, row_limit=args.rows, max_name_column_width=60),
        "```",
        "",
    ])
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"profile-{args.device.split(':')[0]}-{args.shape}"
    (args.out / f"{stem}.md").write_text(text)
    self_time = "self_device_time_total" if cuda else "self_cpu_time_total"
    (args.out / f"{stem}.json").write_text(json.dumps({
        "command": f"python -m benchmarks.profile_forward --device {args.device} --shape {args.shape} --docs {args.docs} --rows {args.rows}",
        "card": card, "torch": torch.__version__, "docs": args.docs, "attention": engine.runner.layout.name,
        "tokens": scores.tokens, "batches": scores.batches, "kernel_launches": launches,
        "operators": {e.key: {"count": e.count, "self_us": getattr(e, self_time)} for e in events},
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
