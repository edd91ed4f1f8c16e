"""Every code block in README.md and docs/*.md runs as written, or says why it cannot.

Python blocks run page by page, verbatim and in order, in one fresh interpreter per page, so a
block may use what an earlier block of its page defined and nothing else. Shell blocks run with
bash, each on its own, and must exit 0 (or the code their first line promises with
`# exits with N: <why>`). A shell block that cannot run here (installs, docker, kubectl, a GPU
worker) starts with `# not run in tests: <reason>`. Everything runs against what a user would
have: a real Redis, a real worker on a tiny model, a real gateway, and RERANK_* in the environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.gateway_helpers import KEY, Gateway
from tests.helpers import free_port

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON = {"python"}
SHELL = {"bash", "console", "sh", "shell"}
TEXT = {"text", "yaml", "json", "jsonl", "ini", "dotenv", "mermaid", "promql", "http", "toml"}
NOT_RUN = "# not run in tests: "
EXITS = re.compile(r"# exits with (\d+): \S")
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<language>[\w-]*)[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.MULTILINE | re.DOTALL)
GATEWAY_MODEL = "BAAI/bge-reranker-v2-m3"
"""The model name the gateway examples send; the test gateway maps it onto the tiny model."""


@dataclass(frozen=True)
class Block:
    """One fenced code block: its page, first line number, language and text (dedented)."""

    page: Path
    line: int
    language: str
    code: str

    @property
    def where(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page
        return f"{page}:{self.line}"

    @property
    def first_line(self) -> str:
        return self.code.lstrip("\n").split("\n", 1)[0].strip()


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of `page`, in order."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        indent = match["indent"]
        code = "".join(line.removeprefix(indent) for line in match["body"].splitlines(keepends=True))
        found.append(Block(page, text.count("\n", 0, match.start()) + 1, match["language"], code))
    return found


def shell_blocks_to_run() -> list[Block]:
    return [b for page in PAGES for b in blocks(page) if b.language in SHELL and not b.first_line.startswith(NOT_RUN)]


def pages_with_python() -> list[Path]:
    return [page for page in PAGES if any(b.language in PYTHON for b in blocks(page))]


# What every block must be: run, or marked with a reason --------------------------------------------


def problem(block: Block) -> str | None:
    """Why `block` can be neither run nor read as it is, or None when it is fine."""
    if block.language not in PYTHON | SHELL | TEXT:
        return f"{block.where}: a ```{block.language} block: label it python, bash or text"
    if block.first_line.startswith(NOT_RUN.strip()):
        if block.language not in SHELL:
            return f"{block.where}: only shell blocks may skip; Python blocks always run"
        if len(block.first_line) <= len(NOT_RUN) or not block.first_line.startswith(NOT_RUN):
            return f"{block.where}: write '{NOT_RUN}<reason>'"
    return None


def test_every_block_is_run_or_says_why_not():
    # Given every fenced block of the README and docs/
    # Then each is Python or shell that runs, a shell block that says why not, or text to read
    problems = [p for page in PAGES for b in blocks(page) if (p := problem(b))]
    assert not problems, "\n".join(problems)


def test_a_block_that_is_neither_run_nor_marked_is_a_problem(tmp_path):
    # Given blocks a reader could not tell apart from commands, or marked without a reason
    page = tmp_path / "page.md"
    page.write_text(
        "```\nrerank workers\n```\n\n```bash\n# not run in tests:\nrerank workers\n```\n\n"
        "```python\n# not run in tests: slow\nprint(1)\n```\n\n```bash\n# not run in tests: needs docker\ndocker ps\n```\n"
    )
    # When each is checked, Then only the last passes
    assert [problem(b) is None for b in blocks(page)] == [False, False, False, True]


def test_the_block_parser_sees_what_a_reader_sees(tmp_path):
    # Given a page with an indented shell block, a marked one, a picture and an unlabelled fence
    page = tmp_path / "page.md"
    page.write_text(
        "# t\n\n- step:\n\n  ```bash\n  rerank workers\n  ```\n\n```bash\n# not run in tests: needs docker\ndocker compose up\n```\n\n"
        "```text\n a ─▶ b\n```\n\n```\nplain\n```\n"
    )
    # When it is parsed
    found = blocks(page)
    # Then each block is found with its language, line and dedented text
    assert [(b.language, b.line, b.code) for b in found] == [
        ("bash", 5, "rerank workers\n"),
        ("bash", 9, "# not run in tests: needs docker\ndocker compose up\n"),
        ("text", 14, " a ─▶ b\n"),
        ("", 18, "plain\n"),
    ]
    assert found[1].first_line.startswith(NOT_RUN) and not found[0].first_line.startswith(NOT_RUN)


# Running them against a real fleet ---------------------------------------------------------------


@pytest.fixture(scope="module")
def user_env(tmp_path_factory, shared_worker, redis_server, tiny_model) -> Iterator[dict[str, str]]:
    """The environment a user of the docs has: broker, model, a gateway and its key, our commands on PATH."""
    gateway = Gateway(
        tmp_path_factory.mktemp("docs-gateway"),
        redis_server.url,
        tiny_model,
        {"RERANK_GATEWAY_MODEL_ALIASES": json.dumps({GATEWAY_MODEL: str(tiny_model)})},
    )
    gateway.wait_until("/ready")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "RERANK_BROKER_URL": redis_server.url,
        "RERANK_MODEL": str(tiny_model),
        "RERANK_TORCH_THREADS": "1",
        "RERANK_GATEWAY_URL": gateway.url,
        "RERANK_API_KEY": KEY,
        "RERANK_GATEWAY_PORT": str(free_port()),  # for a block that starts its own gateway
    }
    yield env
    gateway.stop()


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A working directory that looks like the repository root, so examples/ paths resolve and
    files an example writes land in a temporary folder, not in the checkout."""
    for entry in ROOT.iterdir():
        if not entry.name.startswith("."):  # no .env, .git, .venv: an example must not write into them
            (tmp_path / entry.name).symlink_to(entry)
    return tmp_path


RUNNER = """
import json, sys, traceback
blocks = json.load(sys.stdin)
namespace = {"__name__": "__main__"}
for where, code in blocks:
    print(f"--- {where}", flush=True)
    try:
        exec(compile(code, where, "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"FAILED: {where}", file=sys.stderr, flush=True)
        sys.exit(1)
"""


def shape(value: object) -> object:
    """What a JSON value looks like with its scalars replaced by their types: keys, nesting and list lengths stay."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return type(value).__name__


def test_the_shape_of_a_printed_result_tells_a_changed_result_from_new_values():
    # Given a documented result and what a later run printed: other values, and then a renamed and an added field
    shown = {"items": [{"id": "a", "score": 0.9}], "scored": 8, "info": {"model": "m", "revision": None}}
    # Then new values keep the shape, a renamed field, one more item or a number for a string change it
    assert shape({**shown, "scored": 3, "info": {"model": "x", "revision": None}}) == shape(shown)
    assert shape({**shown, "info": {"model": "m", "commit": None}}) != shape(shown)
    assert shape({**shown, "items": shown["items"] * 2}) != shape(shown)
    assert shape({**shown, "info": {"model": 1, "revision": None}}) != shape(shown)


@pytest.mark.integration
@pytest.mark.parametrize("page", pages_with_python(), ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run_as_written(page, user_env, checkout):
    # Given the page's Python blocks, in order
    code = [(b.where, b.code) for b in blocks(page) if b.language in PYTHON]
    # When they run in one fresh interpreter, as a reader pasting them one after another
    ran = subprocess.run(
        [sys.executable, "-c", RUNNER], input=json.dumps(code), env=user_env, cwd=checkout, capture_output=True, text=True, timeout=240
    )
    # Then every block ran without an error
    assert ran.returncode == 0, f"{ran.stderr}\n--- stdout:\n{ran.stdout[-4000:]}"
    printed = dict(re.findall(r"^--- (\S+)\n(.*?)(?=^--- |\Z)", ran.stdout, re.MULTILINE | re.DOTALL))
    assert list(printed) == [where for where, _ in code]
    # And a JSON block right after a Python block shows what that block prints: the same keys, list lengths and types
    shown = blocks(page)
    for block, following in zip(shown, shown[1:]):
        if block.language in PYTHON and following.language == "json":
            assert shape(json.loads(printed[block.where])) == shape(json.loads(following.code)), (
                f"{following.where} no longer shows what {block.where} prints:\n{printed[block.where][:3000]}"
            )
    if page.name == "README.md":
        # And the first example printed its ten best chunks, best first
        scores = [float(line.split()[0]) for line in printed[code[0][0]].splitlines()]
        assert len(scores) == 10 and scores == sorted(scores, reverse=True), printed[code[0][0]]


@pytest.mark.integration
@pytest.mark.parametrize("block", shell_blocks_to_run(), ids=lambda b: b.where)
def test_shell_blocks_run_as_written(block, user_env, checkout):
    # Given a shell block with no reason not to run, and the exit code it promises (0 unless it says)
    promised = EXITS.match(block.first_line)
    expected = int(promised[1]) if promised else 0
    # When bash runs it, stopping at the first command that fails (anything it left running is stopped after)
    block_process = subprocess.Popen(
        ["bash", "-e", "-o", "pipefail", "-c", block.code], env=user_env, cwd=checkout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = block_process.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(block_process.pid, signal.SIGTERM)
    ran = subprocess.CompletedProcess(block_process.args, block_process.returncode, stdout, stderr)
    # Then it ends as the page says
    assert ran.returncode == expected, f"{block.where} exited {ran.returncode}, expected {expected}\n{ran.stdout[-3000:]}\n{ran.stderr[-3000:]}"
