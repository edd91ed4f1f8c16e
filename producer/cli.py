"""`rerank`: run two-stage jobs from JSON or JSONL files, follow them by id, list the workers."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import textwrap
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pydantic import ValidationError

from contract.errors import (
    BrokerUnavailable,
    InvalidRequest,
    JobCancelled,
    ModelLoadError,
    RerankError,
    RerankTimeout,
    redact,
)
from contract.formats import chunk_pool
from contract.names import DEFAULT_QUEUE
from contract.schemas import MAX_WINDOWS, Candidate, TwoStageRequest, TwoStageResult
from contract.settings import Settings

if TYPE_CHECKING:  # Celery, kombu, redis and rich load when a command needs them, so usage errors answer at once
    from rich.table import Table

    from producer.client import RerankClient
    from producer.fleet import WorkerInfo
    from producer.jobs import JobProgress, RerankJob

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_BROKER = 3
EXIT_TIMEOUT = 4
EXIT_CANCELLED = 5
EXIT_NOT_FOUND = 6
EXIT_INTERRUPTED = 130
EXIT_PIPE = 141
EXIT_CODES = {
    EXIT_OK: "success; for status, also a job still running",
    EXIT_FAILED: "a job failed in a worker; for batch, a line did not succeed",
    EXIT_INVALID: "invalid input, settings or usage (RERANK_BROKER_URL unset where a broker is needed; in-process, a "
    "RERANK_MODEL that cannot be loaded here); nothing was queued",
    EXIT_BROKER: "the broker or result backend cannot be reached, refuses the password, or is out of memory",
    EXIT_TIMEOUT: "no result within --timeout; the job may still finish (its id is printed)",
    EXIT_CANCELLED: "the job was cancelled",
    EXIT_NOT_FOUND: "nothing found: no worker has started a job with this id (unknown, expired or still queued: "
    "Celery cannot tell these apart), or no worker answered",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
    EXIT_PIPE: "the reader of standard output went away (e.g. `| head`), as for any tool ended by SIGPIPE",
}
# First match wins: TaskTimedOut is a RerankTimeout, and everything is a RerankError.
ERROR_EXIT_CODES = [
    (InvalidRequest, EXIT_INVALID),
    (ModelLoadError, EXIT_INVALID),  # in-process: the model RERANK_MODEL names cannot be loaded here
    (BrokerUnavailable, EXIT_BROKER),
    (RerankTimeout, EXIT_TIMEOUT),
    (JobCancelled, EXIT_CANCELLED),
    (RerankError, EXIT_FAILED),
]
# `status` without --wait: a job's state is its answer, not an error.
STATE_EXIT_CODES = {"FAILURE": EXIT_FAILED, "REVOKED": EXIT_CANCELLED, "PENDING": EXIT_NOT_FOUND}
STDIN = "-"


def build_parser() -> argparse.ArgumentParser:
    """Return the `rerank` argument parser."""
    epilog = "exit codes, the same for every command:\n" + "\n".join(
        textwrap.fill(meaning, 78, initial_indent=f"  {code:>3}  ", subsequent_indent=" " * 7) for code, meaning in EXIT_CODES.items()
    )
    shared = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: `rerank --json status ID` and `rerank status ID --json` both count.
    shared.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="Print JSON on stdout instead of tables.")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=text, description=text, parents=[shared], epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        sub.set_defaults(parser=sub)  # to report a bad option with this command's usage, not the top level's
        return sub

    parser = argparse.ArgumentParser(
        prog="rerank", description="Two-stage BGE re-ranking on Celery.", epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="Print JSON on stdout instead of tables.")
    parser.add_argument("--version", action="version", version=f"rerank {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = command("run", "Run a two-stage job from a JSON file (query + candidates).")
    run.add_argument("job", help='JSON file, or - for standard input: {"query": ..., "candidates": [...], "top_k_docs"?, "top_k_chunks"?}')
    run.add_argument("--top-k-docs", type=count(), help="Papers kept by stage 1 (default: the file's, else 20).")
    run.add_argument("--top-k-chunks", type=count(), help="Chunks returned by stage 2 (default: the file's, else all).")
    _job_options(run)
    run.add_argument("--timeout", type=seconds, default=600.0, help="Seconds to wait for the result.")
    run.add_argument("--no-wait", action="store_true", help="Print the job id and exit; follow it with `rerank status`.")

    batch = command("batch", "Run many two-stage jobs from JSONL (one job per line), in parallel.")
    batch.add_argument("jobs", help="JSONL file, or - for standard input: one job per line, each like the JSON file of `run`.")
    batch.add_argument("-o", "--output", default=STDIN, help="Where to write one result per line, in input order (default: stdout).")
    _job_options(batch)
    batch.add_argument("--timeout", type=seconds, default=3600.0, help="Seconds to wait for the whole batch.")
    batch.add_argument("--no-progress", action="store_true", help="No progress bar on stderr.")

    status = command("status", "Show a job's state by id, and its result once done.")
    status.add_argument("job_id")
    status.add_argument("--wait", action="store_true", help="Wait for the result (up to --timeout).")
    status.add_argument("--timeout", type=seconds, default=600.0, help="Seconds to wait with --wait.")

    cancel = command("cancel", "Cancel (revoke) a job by id.")
    cancel.add_argument("job_id")

    workers = command("workers", "List the workers that answer: model, queues, pool size, tasks done.")
    workers.add_argument("--timeout", type=seconds, default=2.0, help="Seconds to wait for replies.")

    metrics = command("metrics", "Serve Prometheus metrics of the queues: depth, and the oldest message's age.")
    metrics.add_argument("--port", type=count(65_535), default=9808, help="Port to serve /metrics on (default 9808), on RERANK_METRICS_ADDRESS, behind RERANK_METRICS_TOKEN_FILE's token if set.")
    metrics.add_argument("--queues", help="Comma-separated queues (default: every queue the models' workers consume).")
    metrics.add_argument("--models", help="Comma-separated models whose queues to watch (default: RERANK_MODEL).")
    metrics.add_argument("--once", action="store_true", help="Print the metrics once and exit instead of serving them (with --json: one object per queue).")
    return parser


def _version() -> str:
    try:
        return version("bge-rerank-celery")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _job_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min-score", type=score, help="Drop chunks scoring below this (0-1).")
    parser.add_argument("--windows", type=count(MAX_WINDOWS), help=f"Stage-1 windows per paper, 1-{MAX_WINDOWS} (default RERANK_STAGE1_WINDOWS).")


def count(most: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from 1 to `most` (unbounded when None)."""

    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not 1 <= value <= (most or value):
            raise argparse.ArgumentTypeError(f"{value} is not between 1 and {most}" if most else f"{value} is less than 1")
        return value

    return whole


def score(text: str) -> float:
    """An argparse type: a score between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1]; scores are sigmoids")
    return value


def seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive, finite number of seconds")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point of `rerank`; returns one of EXIT_CODES."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # here, not at exit, so a closed pipe is caught below
    except BrokenPipeError:
        # Later writes (and the interpreter's own flush at exit) go nowhere instead of raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE
    except KeyboardInterrupt:
        print("rerank: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    command = {"run": _run, "batch": _batch, "status": _status, "cancel": _cancel, "workers": _workers, "metrics": _metrics}[args.command]
    try:
        try:
            settings = Settings()
        except ValidationError as e:
            raise InvalidRequest(f"invalid settings: {e}") from e
        return command(args, settings)
    except RerankError as e:
        code = next(code for kind, code in ERROR_EXIT_CODES if isinstance(e, kind))
        name = "" if code != EXIT_FAILED else f"{type(e).__name__}: "
        print(f"rerank: {name}{e}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": {"type": type(e).__name__, "message": str(e)}, "exit_code": code}))
        return code


def _broker_client(settings: Settings, what: str) -> RerankClient:
    """A client for commands that only make sense with workers; without a broker that is a settings error (exit 2)."""
    if not settings.broker_url:
        raise InvalidRequest(f"no RERANK_BROKER_URL: cannot {what} without a broker (tasks run inside each producer); set it")
    return _client(settings)


def _client(settings: Settings) -> RerankClient:
    from producer.client import RerankClient

    return RerankClient(settings)


def parse_job(text: str, args: argparse.Namespace) -> TwoStageRequest:
    """One job from its JSON text, with the command line's options over the file's; `run` and `batch` share it.

    Raises:
        InvalidRequest: the text is not JSON, or not a valid two-stage request (unknown keys included).
    """
    overrides = {
        "top_k_docs": getattr(args, "top_k_docs", None),
        "top_k_chunks": getattr(args, "top_k_chunks", None),
        "min_score": args.min_score,
        "windows": args.windows,
    }
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise InvalidRequest(f"a job is a JSON object with query and candidates, not {type(data).__name__}")
        return TwoStageRequest.model_validate({**data, **{k: v for k, v in overrides.items() if v is not None}})
    except (json.JSONDecodeError, ValidationError) as e:
        raise InvalidRequest(str(e)) from e


def read_text(path: str) -> str:
    """The UTF-8 text of `path` (`-`: standard input); an unreadable file is invalid input (exit 2), not a traceback."""
    try:
        if path == STDIN:
            return sys.stdin.buffer.read().decode("utf-8")
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"cannot read {_name(path)}: {e}") from e


def _name(path: str) -> str:
    return "standard input" if path == STDIN else path


def _run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        request = parse_job(read_text(args.job), args)  # before the client: a bad job is told at once, nothing loaded
    except InvalidRequest as e:
        raise InvalidRequest(f"invalid job {_name(args.job)}: {e}") from e
    client = _broker_client(settings, "use --no-wait") if args.no_wait else _client(settings)
    try:
        handle = client.submit(**request.model_dump(exclude={"candidates"}), candidates=request.candidates)
    except InvalidRequest as e:
        raise InvalidRequest(f"invalid job {_name(args.job)}: {e}") from e
    if args.no_wait:
        print(json.dumps({"job_id": handle.id}) if args.json else handle.id)
        return EXIT_OK
    try:
        result = handle.result(args.timeout)
    except RerankTimeout as e:
        print(f"rerank: {e}", file=sys.stderr)
        print(json.dumps({"job_id": handle.id, "state": "TIMEOUT"}) if args.json else f"job id: {handle.id}")
        return EXIT_TIMEOUT
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        print(render(result, request.candidates, client.chunk_chars))
    return EXIT_OK


def _batch(args: argparse.Namespace, settings: Settings) -> int:
    lines = [(n, line) for n, line in enumerate(read_text(args.jobs).splitlines(), 1) if line.strip()]
    if not lines:
        raise InvalidRequest(f"{_name(args.jobs)} holds no job: write one JSON job per line")
    client = _client(settings)
    outcomes: dict[int, dict[str, Any]] = {}
    valid: list[tuple[int, TwoStageRequest]] = []
    for n, line in lines:
        try:
            valid.append((n, client.validate(parse_job(line, args))))
        except InvalidRequest as e:
            outcomes[n] = {"line": n, "state": "INVALID", "error": {"type": "InvalidRequest", "message": str(e)}}
    try:
        out: IO[str] = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
    except OSError as e:
        raise InvalidRequest(f"cannot write results to {args.output}: {e}; nothing was queued") from e
    if not valid:
        print(f"rerank: no valid job in {_name(args.jobs)}; nothing was queued", file=sys.stderr)
    batch = client.submit_many([r for _, r in valid]) if valid else None
    bar = Progress(len(lines), enabled=not args.no_progress)
    written = 0
    ordered = [n for n, _ in lines]
    started = time.monotonic()

    def flush() -> None:
        nonlocal written
        while written < len(ordered) and ordered[written] in outcomes:
            out.write(json.dumps(outcomes[ordered[written]]) + "\n")
            out.flush()
            written += 1

    try:
        flush()
        bar.update(len(outcomes), sum(1 for o in outcomes.values() if "error" in o))
        if batch is not None:
            try:
                for job in batch.as_completed(args.timeout):
                    n = valid[job.index][0]
                    outcomes[n] = _outcome(job, n)
                    bar.update(len(outcomes), sum(1 for o in outcomes.values() if "error" in o))
                    flush()
            except RerankTimeout as e:
                for (n, _), job in zip(valid, batch.jobs):
                    outcomes.setdefault(n, {"line": n, "job_id": job.id, "state": "TIMEOUT", "error": {"type": "RerankTimeout", "message": str(e)}})
                flush()
    finally:
        bar.close()
        if out is not sys.stdout:
            out.close()
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome["state"]] = counts.get(outcome["state"], 0) + 1
    summary = {
        "batch_id": batch.id if batch else None, "lines": len(lines), "states": counts,
        "seconds": round(time.monotonic() - started, 3), "output": args.output,
    }
    summary_out = sys.stderr if args.output == "-" else sys.stdout
    if args.json:
        print(json.dumps(summary), file=summary_out)
    else:
        states = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        print(f"batch {summary['batch_id']}: {len(lines)} jobs in {summary['seconds']:.1f} s: {states}", file=summary_out)
    if counts.get("SUCCESS", 0) == len(lines):
        return EXIT_OK
    return EXIT_INVALID if not valid else EXIT_TIMEOUT if "TIMEOUT" in counts else EXIT_FAILED


def _outcome(job: RerankJob, line: int) -> dict[str, Any]:
    try:
        result = job.result()
    except RerankError as e:
        state = "REVOKED" if isinstance(e, JobCancelled) else "FAILURE"
        return {"line": line, "job_id": job.id, "state": state, "error": {"type": type(e).__name__, "message": str(e)}}
    return {"line": line, "job_id": job.id, "state": "SUCCESS", "result": result.model_dump(mode="json")}


class Progress:
    """A one-line progress bar on stderr; a line per tenth when stderr is not a terminal."""

    def __init__(self, total: int, *, enabled: bool = True, stream: IO[str] | None = None) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = enabled and total > 0
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._last_tenth = -1

    def update(self, done: int, failed: int = 0) -> None:
        """Show `done` of `total` finished, `failed` of them failed."""
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f"{(self.total - done) / rate:.0f}s" if rate > 0 and done < self.total else "-"
        filled = int(30 * done / self.total)
        text = f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} done, {failed} failed, {rate:.1f} jobs/s, eta {eta}"
        if self.tty:
            self.stream.write("\r" + text)
        elif done * 10 // self.total > self._last_tenth:
            self._last_tenth = done * 10 // self.total
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _status(args: argparse.Namespace, settings: Settings) -> int:
    job = _broker_client(settings, "follow a job by id").job(args.job_id)
    if args.wait:
        try:
            job.result(args.timeout)
        except (RerankTimeout, BrokerUnavailable):
            raise
        except RerankError:
            pass  # a failed or cancelled job: its state and error are shown below
    progress = job.progress()
    result = job.result() if progress.state == "SUCCESS" else None
    if args.json:
        print(json.dumps({**progress.model_dump(mode="json"), "result": result.model_dump(mode="json") if result else None}, indent=2))
    else:
        print(render_progress(progress))
        if result is not None:
            print()
            print(render(result))
    if progress.state == "PENDING":
        print(f"rerank: no worker has started job {args.job_id}: it is still queued, or no job has this id (never sent, "
              "or its result expired); Celery cannot tell which. Wait with --wait, or check the id", file=sys.stderr)
    return STATE_EXIT_CODES.get(progress.state, EXIT_OK)


def render_progress(progress: JobProgress) -> str:
    """Format a job's state and each stage's as a small table."""
    lines = [f"job {progress.job_id}: {progress.state} ({progress.fraction:.0%})", f"{'stage':<10}  {'state':<8}  detail"]
    for stage in progress.stages:
        detail = stage.error or (", ".join(f"{k}={v}" for k, v in stage.info.items()) if stage.info else "")
        lines.append(f"{stage.stage:<10}  {stage.state:<8}  {detail}")
    return "\n".join(lines)


def _cancel(args: argparse.Namespace, settings: Settings) -> int:
    job = _broker_client(settings, "cancel a job by id").job(args.job_id)
    before = job.status()
    cancelled = job.cancel()
    if args.json:
        print(json.dumps({"job_id": args.job_id, "cancelled": cancelled, "state_before": before}))
    elif not cancelled:
        print(f"job {args.job_id}: already finished ({before}), nothing to cancel")
    else:
        unknown = " (no worker had started it: queued, or no job has this id; either way it will not run)" if before == "PENDING" else ""
        print(f"job {args.job_id}: cancelled{unknown}")
    return EXIT_OK


def _workers(args: argparse.Namespace, settings: Settings) -> int:
    client = _broker_client(settings, "list workers")
    from producer.fleet import inspect_workers

    workers = inspect_workers(client.app, timeout=args.timeout)
    if args.json:
        print(json.dumps([w.model_dump(mode="json") for w in workers], indent=2))
    elif workers:
        from rich.console import Console

        Console(markup=False, highlight=False, emoji=False).print(workers_table(workers))
    if not workers:
        print(f"rerank: no worker answered within {args.timeout}s on {redact(settings.broker_url)}", file=sys.stderr)
        return EXIT_NOT_FOUND
    return EXIT_OK


def workers_table(workers: list[WorkerInfo]) -> Table:
    """The workers as a table that fits 80 columns: queue names shortened to the part that tells them apart."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, caption=f"queues: {DEFAULT_QUEUE}.<model>.<queue>, shared = {DEFAULT_QUEUE}.<model>; --json for everything")
    for column in ("worker", "model", "queues", "procs", "tasks"):
        table.add_column(column, overflow="fold", justify="right" if column in ("procs", "tasks") else "left")
    for w in workers:
        model, queues = split_queues(w.queues)
        report = w.report or {}
        where = " ".join(_plain(report[key]) for key in ("device", "dtype") if report.get(key))
        table.add_row(
            _plain(w.name), _plain(model or "-") + (f"\n{where}" if where else ""), ", ".join(_plain(q) for q in queues) or "-",
            _plain("?" if w.processes is None else w.processes), _plain("?" if w.tasks_done is None else w.tasks_done),
        )
    return table


def split_queues(queues: list[str]) -> tuple[str | None, list[str]]:
    """The model slug a worker's queues share (`rerank.<slug>...`) and each queue without it; (None, names) when they share none."""
    prefix = f"{DEFAULT_QUEUE}."
    slugs = {q[len(prefix):].split(".", 1)[0] for q in queues}
    if len(slugs) != 1 or not all(q.startswith(prefix) for q in queues):
        return None, queues
    stem = prefix + slugs.pop()
    return stem[len(prefix):], [q[len(stem) + 1:] or "shared" for q in queues]


def _plain(value: Any, most: int = 200) -> str:
    # Replies come from whoever can write to the broker: no terminal control sequences, no walls of text.
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text if len(text) <= most else text[: most - 1] + "…"


def _metrics(args: argparse.Namespace, settings: Settings) -> int:
    from producer.metrics import default_queues, read_queues, registry_for

    client = _broker_client(settings, "watch queues")
    models = [m.strip() for m in (args.models or "").split(",") if m.strip()]
    queues = [q.strip() for q in args.queues.split(",") if q.strip()] if args.queues else default_queues(settings, models)
    if args.once:
        from producer.reaching import reaching

        with reaching("reading the queues", settings.broker_url):
            depths = read_queues(client.app, queues)
        if args.json:
            print(json.dumps([{"queue": d.queue, "messages": d.messages, "oldest_age_s": d.oldest_age} for d in depths], indent=2))
            return EXIT_OK
    try:
        registry = registry_for(client.app, queues)
    except ImportError as e:
        raise InvalidRequest(str(e)) from e
    from prometheus_client import generate_latest

    from producer.scrape import MetricsServer, read_token

    if args.once:
        sys.stdout.write(generate_latest(registry).decode())
        return EXIT_OK
    # The workers' bounded server, on the same address and behind the same token as theirs.
    try:
        token = read_token(settings.metrics_token_file) if settings.metrics_token_file else None
    except (OSError, ValueError) as e:
        raise InvalidRequest(f"cannot read RERANK_METRICS_TOKEN_FILE: {e}; point it at a file holding the token") from e
    server = MetricsServer(registry, args.port, settings.metrics_address, token=token)
    server.start()
    where = f"{settings.metrics_address}:{args.port}/metrics"
    if args.json:
        print(json.dumps({"serving": where, "queues": queues}), flush=True)
    print(f"rerank metrics: serving {len(queues)} queues on {where}: {', '.join(queues)}", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
    return EXIT_OK


def render(result: TwoStageResult, candidates: list[Candidate] | None = None, chunk_chars: int | None = None) -> str:
    """Format both rankings as plain-text tables, joining titles and texts back from `candidates` when given."""
    by_id = {c.id: c for c in candidates or []}
    pool = chunk_pool(candidates, chunk_chars) if candidates and chunk_chars else []
    info = result.documents.info
    lines = [
        f"query: {result.documents.query}",
        f"model: {info.model}  device: {info.device}  dtype: {info.dtype}  worker: {info.worker}",
        "",
        f"Stage 1: {len(result.documents.items)} of {result.documents.scored} papers "
        f"({info.tokenize_ms:.0f} ms tokenize, {info.forward_ms:.0f} ms forward)",
        _row("rank", "score", "id", "title"),
    ]
    lines += [_row(n, f"{item.score:.4f}", item.id, by_id[item.id].title if item.id in by_id else "") for n, item in enumerate(result.documents.items, 1)]
    chunk_info = result.chunks.info
    lines += [
        "",
        f"Stage 2: {len(result.chunks.items)} of {result.chunks.scored} chunks "
        f"({chunk_info.tokenize_ms:.0f} ms tokenize, {chunk_info.forward_ms:.0f} ms forward)",
        _row("rank", "score", "chunk", "section: text"),
    ]
    for n, item in enumerate(result.chunks.items, 1):
        text = f"{pool[item.index].section or 'N/A'}: {pool[item.index].text}" if pool else f"paper {item.doc_id}"
        lines.append(_row(n, f"{item.score:.4f}", item.id, text))
    return "\n".join(lines)


def _row(rank: Any, score: str, ident: str, text: str) -> str:
    width = max(20, shutil.get_terminal_size().columns - 35)  # 80 when not a terminal; the row is 34 wide before the text
    text = " ".join(text.split())
    return f"{rank!s:>4}  {score:>6}  {ident:<18.18}  {text[:width]}{'…' if len(text) > width else ''}"


if __name__ == "__main__":
    sys.exit(main())
