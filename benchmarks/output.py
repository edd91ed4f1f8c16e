"""Where a benchmark's figures go: one Markdown table and one JSON record per run, under benchmarks/results/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parents[1] / "benchmarks" / "results"


def write_results(out: Path, stem: str, table: str, record: dict[str, Any]) -> None:
    """Print `table` and write it to `out`/`stem`.md, and `record` to `out`/`stem`.json."""
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(table.rstrip("\n") + "\n")
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
