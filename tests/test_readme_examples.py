"""The Python examples in the README's "Using it from Python" section run, in order, and do what they say."""

from __future__ import annotations

import re
from pathlib import Path

from producer.schemas import TwoStageResult
from producer.settings import get_settings
from tests.helpers import QUERY, candidates

README = (Path(__file__).parents[1] / "README.md").read_text()


def python_examples() -> list[str]:
    section = README[README.index("## Using it from Python") : README.index("## Running real workers")]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def test_the_readme_examples_run_in_process(monkeypatch, tiny_model, capsys):
    # Given the README's examples and the names they assume (query, candidates, jobs)
    examples = python_examples()
    assert len(examples) == 4, "five-line, batch, async and error-handling examples"
    monkeypatch.delenv("RERANK_BROKER_URL", raising=False)
    monkeypatch.setenv("RERANK_MODEL", str(tiny_model))
    monkeypatch.setenv("RERANK_TORCH_THREADS", "1")
    get_settings.cache_clear()
    namespace = {"query": QUERY, "candidates": candidates(8), "jobs": [(QUERY, candidates(n)) for n in (3, 5)]}
    try:
        # When each runs in turn, in one namespace, as a reader would paste them
        for code in examples:
            exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    finally:
        get_settings.cache_clear()
    # Then they produced real results: printed rankings, ordered batch results, an awaited result
    printed = capsys.readouterr().out.splitlines()
    assert len(namespace["results"]) == 2 and all(isinstance(r, TwoStageResult) for r in namespace["results"])
    assert [r.documents.scored for r in namespace["results"]] == [3, 5]
    assert isinstance(namespace["result"], TwoStageResult)
    scores = [float(line.split()[0]) for line in printed if re.match(r"^0\.\d+ p\d+ ", line)]
    assert scores and scores == sorted(scores, reverse=True)
