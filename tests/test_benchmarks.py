"""Every benchmark runs once as a user runs it, on the tiny model with its smallest options, and what it
claims to vary really varied: a budget changes the batches, a compiled module is the one that ran, a
row ran the layout, dtype, process shape, transport or tree it is labelled with.

Each benchmark is a subprocess (`python -m benchmarks.<name> ... --out <tmp>`), started when the
session's first test here asks, a few at a time, longest first; its test waits for it and reads the
JSON it wrote. benchmarks/gpu_check.sh needs a GPU: its invocations are parsed and checked against
each benchmark's own argument parser instead.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import ROOT, need_binary

pytestmark = pytest.mark.integration

# What each test runs besides `--out OUT`: the smallest run in which what the benchmark varies can
# still be seen, and whether it starts a redis-server of its own. Longest first: the order they start in.
COMMANDS: dict[str, tuple[list[str], bool]] = {
    "fleet_throughput": (["--shape", "tiny", "--shapes", "threads,device+1", "--kinds", "k10", "--seconds", "1", "--producers", "1",
                          "--closed-jobs", "4", "--rates-k10", "4"], True),
    "attention": (["--device", "cpu", "--shape", "tiny", "--docs", "4", "--repeats", "1", "--e2e", "--only",
                   "ours padded,ours packed,packed + qkv,packed - prune_last_layer,packed + cuda_graphs,packed tokenizing in slices of 16"],
                  True),
    "gateway_load": (["--connections", "20", "--seconds", "2", "--queue-bound", "2", "--docs", "4", "--workers", "1"], True),
    "gateway_latency": (["--shape", "tiny", "--docs", "4", "--runs", "5", "--warmup", "1"], True),
    "cpu_processes": (["--shape", "tiny", "--docs", "4", "--tasks", "2"], False),
    "take_overhead": (["--shape", "tiny", "--rounds", "1", "--samples", "3", "--warmup", "1"], True),
    "cpu_regression": (["--baseline", "HEAD", "--shape", "tiny", "--rounds", "1", "--repeats", "1", "--docs", "2",
                        "--rows", "bf16/in-process"], False),
    "sweep": (["--shape", "tiny", "--docs", "4", "--repeats", "1", "--budgets", "512,2048", "--attention", "padded",
               "--compile", "default", "--compile-backend", "eager"], False),
    "chain_overhead": (["--shape", "tiny", "--docs", "2", "--runs", "2", "--warmup", "1", "--dtype", "bf16"], True),
    # Its Redis rows (--skip-e2e off) vary nothing; benchmarks.attention's do, and run here.
    "run": (["--shape", "tiny", "--docs", "4", "--repeats", "1", "--bf16-docs", "2", "--max-batch-tokens", "512", "--skip-e2e",
             "--plots", "{out}"], False),
    "latency": (["--shape", "tiny", "--samples", "5", "--warmup", "1"], True),
    "job_cost": (["--shape", "tiny", "--jobs", "2", "--warmup", "1", "--idle-seconds", "0.5", "--no-profile"], True),
    "score_cache": (["--shape", "tiny", "--warm", "2"], True),
    "fresh_shapes": (["--device", "cpu", "--shape", "tiny", "--pad-multiple", "64", "--requests", "2", "--docs", "4"], False),
    "profile_forward": (["--device", "cpu", "--shape", "tiny", "--docs", "4", "--rows", "5"], False),
}
# More than the cores: much of a benchmark's time is spent waiting for processes it starts.
AT_ONCE = 4
LIMIT_S = 240


@dataclass
class Run:
    """One benchmark's subprocess: where it writes, and how it ended."""

    name: str
    out: Path
    done: threading.Event = field(default_factory=threading.Event)
    returncode: int | None = None
    seconds: float = 0.0

    def output(self) -> str:
        """What it printed (stdout and stderr)."""
        return (self.out / "output.log").read_text(errors="replace")

    def json(self, name: str) -> dict:
        """A JSON file it wrote."""
        return json.loads((self.out / name).read_text())


class Benchmarks:
    """Runs the benchmark commands, `AT_ONCE` at a time in COMMANDS' order, each in its own session (so a stuck one is killed whole)."""

    def __init__(self, root: Path, names: list[str]) -> None:
        """Start running `names` (in COMMANDS' order) under `root`."""
        self.runs = {name: Run(name, root / name) for name in COMMANDS if name in names}
        self.waiting: queue.Queue[Run] = queue.Queue()
        for run in self.runs.values():
            self.waiting.put(run)
        self.processes: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.stopped = False
        env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        self.env = {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.started = time.time()
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(AT_ONCE)]
        for thread in self.threads:
            thread.start()

    def _work(self) -> None:
        while True:
            try:
                run = self.waiting.get_nowait()
            except queue.Empty:
                return
            run.out.mkdir(parents=True)
            options, _ = COMMANDS[run.name]
            command = [sys.executable, "-m", f"benchmarks.{run.name}", *(o.replace("{out}", str(run.out)) for o in options), "--out", str(run.out)]
            started = time.monotonic()
            with (run.out / "output.log").open("wb") as log:
                with self.lock:
                    if self.stopped:
                        return
                    process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                    self.processes[run.name] = process
                try:
                    run.returncode = process.wait(timeout=LIMIT_S)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    run.returncode = process.wait()
            run.seconds = time.monotonic() - started
            run.done.set()

    def result(self, name: str) -> Run:
        """Wait for benchmark `name`; fail with its output unless it exited 0."""
        run = self.runs[name]
        if not run.done.wait(timeout=LIMIT_S * len(self.runs)):
            pytest.fail(f"benchmarks.{name} did not finish")
        assert run.returncode == 0, f"benchmarks.{name} exited {run.returncode} after {run.seconds:.0f} s:\n{run.output()[-4000:]}"
        print(f"benchmarks.{name}: {run.seconds:.1f} s")
        # Only --out was written: not the shipped results, not the docs' charts.
        shipped = [p for folder in ("benchmarks/results", "docs") for p in (ROOT / folder).rglob("*") if p.stat().st_mtime >= self.started]
        assert not shipped, f"written outside --out while benchmarks ran: {shipped}"
        return run

    def stop(self) -> None:
        """Start nothing more and kill what still runs (a failed session), its children with it."""
        with self.lock:
            self.stopped = True
            for process in self.processes.values():
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)


def benchmark_of(test: str) -> str | None:
    """The benchmark a test here is about: its name follows `test_`."""
    return next((name for name in COMMANDS if test.startswith(f"test_{name}_")), None)


@pytest.fixture(scope="session")
def benchmarks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The benchmarks whose tests this session runs, started at once (a few at a time) on the tiny model, built first."""
    from benchmarks.corpus import model_dir

    model_dir("tiny")  # once, before several benchmarks would build it at the same time
    selected = {benchmark_of(item.originalname) for item in request.session.items if getattr(item, "module", None) is sys.modules[__name__]}
    names = [name for name in COMMANDS if name in selected and (not COMMANDS[name][1] or shutil.which("redis-server"))]
    runner = Benchmarks(tmp_path_factory.mktemp("benchmarks"), names)
    yield runner
    runner.stop()


def finished(benchmarks: Benchmarks, name: str) -> Run:
    """The finished run of `name`, once redis-server is known to be there if it needs one."""
    if COMMANDS[name][1]:
        need_binary("redis-server")
    return benchmarks.result(name)


# -- the benchmarks -----------------------------------------------------------------------------


def test_fleet_throughput_threads_score_in_the_worker_and_device_shapes_in_a_device_process(benchmarks):
    result = finished(benchmarks, "fleet_throughput").json("fleet-cpu-tiny.json")
    rows = result["rows"]
    # Both worker shapes ran, closed and open loop, at the rate asked for
    assert {(r["shape"], r["loop"]) for r in rows} == {(s, loop) for s in ("threads", "device+1") for loop in ("closed", "open")}
    for row in rows:
        if row["loop"] == "open":
            assert row["offered_per_s"] == 4.0 and row["jobs"] == 4 and row["completed"] == 4
        else:
            assert row["jobs"] == 4
    # The threads shape scored in the worker's own process; device+1 in a device process fed by a host process
    cpu = {shape: {role: sum(r["cpu_ms_per_job_by_process"][role] for r in rows if r["shape"] == shape) for role in ("parent", "hosts", "device")}
           for shape in ("threads", "device+1")}
    assert cpu["threads"]["parent"] > 0 and cpu["threads"]["hosts"] == 0 and cpu["threads"]["device"] == 0
    assert cpu["device+1"]["device"] > 0 and cpu["device+1"]["hosts"] > 0


def test_run_rows_ran_their_dtype_within_the_budget_and_missing_extras_are_skipped_with_a_note(benchmarks):
    run = finished(benchmarks, "run")
    result = run.json("cpu-tiny.json")
    rows = result["implementations"]
    fp32, bf16 = rows["ours in-process (fp32)"], rows["ours in-process (bf16)"]
    # Each dtype row ran in its dtype, on the docs asked for
    assert fp32["ran"]["dtype"] == "float32" and fp32["docs"] == 4
    assert bf16["ran"]["dtype"] == "bfloat16" and bf16["docs"] == 2
    # --max-batch-tokens was the budget: no batch held more (4 docs of ~450 tokens: a batch each)
    for row in (fp32, bf16):
        assert row["ran"]["max_batch_tokens"] == 512
        assert row["batches"] >= math.ceil(row["padded_tokens"] / 512) > 1
    assert result["queue"] == {} and not any(name.startswith("ours via Redis") for name in rows)
    # Our scores are the seed's, in fp32
    assert fp32["max_abs_delta_vs_seed_fp32"] < 1e-4
    # What this environment lacks is skipped with a note
    if importlib.util.find_spec("sentence_transformers") is None:
        assert "sentence-transformers" in result["skipped"]["sentence-transformers (fp32)"]
        assert "sentence-transformers (fp32)" not in rows
        assert "Skipped sentence-transformers (fp32)" in (run.out / "cpu-tiny.md").read_text()
    else:
        assert rows["sentence-transformers (fp32)"]["docs"] == 4
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib" in result["skipped"]["plot"]
    else:
        assert (run.out / "benchmark-cpu-tiny.png").stat().st_size > 0


def test_attention_rows_ran_their_layout_and_fusions_in_process_and_through_a_worker(benchmarks):
    result = finished(benchmarks, "attention").json("attention-cpu-tiny-fp32.json")
    rows = result["rows"]
    padded, packed = rows["ours padded"], rows["ours packed"]
    # Each row ran the layout it is named after: padded pads, packed does not
    assert padded["ran"]["attention"] == "padded" and padded["padded_tokens"] > padded["tokens"]
    assert packed["ran"]["attention"] == "packed" and packed["padded_tokens"] == packed["tokens"]
    assert packed["ran"]["kernel"] == "sdpa_per_pair"  # no FlashAttention on a CPU
    # Each fusion row ran an encoder with that fusion, and only that one changed
    assert rows["packed + qkv"]["ran"]["fused_qkv_weights"] and not packed["ran"]["fused_qkv_weights"]
    assert rows["packed - prune_last_layer"]["ran"]["fusions"] == {**packed["ran"]["fusions"], "prune_last_layer": False}
    assert rows["packed tokenizing in slices of 16"]["ran"]["tokenize_slice"] == 16 and packed["ran"]["tokenize_slice"] == 0
    # Packed rows score as padded does; a row that cannot run here says so instead of a figure
    for name in ("ours packed", "packed + qkv", "packed - prune_last_layer"):
        assert rows[name]["vs_padded_same_dtype"]["max_abs_delta"] < 1e-4
    assert "packed + cuda_graphs" not in rows and "FlashAttention" in result["environment"]["failed_rows"]["packed + cuda_graphs"]
    # Through Redis, each worker ran the attention its row names
    for attention in ("padded", "packed"):
        assert result["end_to_end"][f"via Redis + worker, {attention}"]["attention"] == attention


def test_gateway_load_refuses_only_past_the_queue_bound_and_answers_everything(benchmarks):
    result = finished(benchmarks, "gateway_load").json("gateway-load-cpu-tiny-20c-2s.json")
    statuses = result["statuses"]
    # The queue bound was applied: 20 connections on one worker got 429s, each past the bound of 2
    assert statuses.get("429", 0) > 0 and statuses.get("200", 0) > 0
    assert result["429_below_bound"] == 0 and result["429_depths_min_max"][0] > 2
    # Every request was answered, none with an unexpected 5xx, and the gateway counted what the clients saw
    assert result["answered"] == result["sent"] and result["unexpected_5xx"] == {}
    assert result["gateway_counted"] == statuses


def test_take_overhead_workers_took_with_their_own_transport(benchmarks):
    result = finished(benchmarks, "take_overhead").json("take-overhead-cpu-tiny.json")
    ours, kombu = result["redis_calls_per_round"]["ours"][0], result["redis_calls_per_round"]["kombu"][0]
    tasks = 2 * 3  # requests and no-ops
    # Each worker took with its own transport: ours by a script, kombu's by BRPOP
    assert ours["eval"] >= tasks and ours["brpop"] == 0
    assert kombu["brpop"] >= tasks and kombu["eval"] == 0
    assert set(result["results"]) == {"ours", "kombu"}


def test_cpu_processes_layouts_ran_as_that_many_processes_of_that_many_threads(benchmarks):
    result = finished(benchmarks, "cpu_processes").json("cpu-processes-tiny.json")
    cores = os.cpu_count() or 1
    assert {(r["processes"], r["threads"]) for r in result["rows"]} >= {(1, cores), (cores, 1)}
    for row in result["rows"]:
        # Each layout ran as that many processes of that many threads, which took every task between them
        assert len({p["pid"] for p in row["ran"]}) == row["processes"]
        assert all(p["torch_threads"] == row["threads"] for p in row["ran"])
        assert sum(p["tasks"] for p in row["ran"]) == 2


def test_gateway_latency_gateway_rounds_went_through_the_gateway_and_client_rounds_around_it(benchmarks):
    result = finished(benchmarks, "gateway_latency").json("gateway-latency-cpu-tiny.json")
    assert len(result["python_client_ms"]) == len(result["gateway_http_ms"]) == 5
    # The gateway answered exactly the gateway's half of the rounds (warm-up included), the client's went around it
    assert result["gateway_counted"] == {"200": 5 + 1}
    for path in ("python_client", "gateway_http"):
        assert 0 < result["ms"][path]["p50"] <= result["ms"][path]["p99"]


def test_cpu_regression_each_side_ran_its_own_tree_in_the_dtype_asked_for(benchmarks):
    result = finished(benchmarks, "cpu_regression").json("cpu-regression-tiny.json")
    (row,) = result["rows"]
    assert (row["dtype"], row["mode"]) == ("bf16", "in-process")
    # Each side ran its own tree's code, in bf16, in the probe's process
    trees = result["trees"]
    assert trees["this tree"] == str(ROOT) and trees["@HEAD"] != str(ROOT)
    for name, tree in trees.items():
        (measured,) = row["ran"][name]
        assert measured["tree"] == tree and measured["dtype"] == "bfloat16" and measured["in_this_process"]
        assert len(row["samples"][name]) == 1


def test_chain_overhead_both_stages_ran_on_the_worker_in_the_dtype_asked_for(benchmarks):
    result = finished(benchmarks, "chain_overhead").json("chain-cpu-tiny.json")
    assert len(result["runs_ms"]) == 2
    for job in result["runs_ms"]:
        # Both stages ran on the worker in the dtype asked for, on the papers sent and their chunks
        assert job["ran"]["documents"]["dtype"] == job["ran"]["chunks"]["dtype"] == "bfloat16"
        assert job["ran"]["documents"]["scored"] == 2 and job["ran"]["chunks"]["scored"] > 2
        assert job["wall"] >= job["compute"] > 0 and job["stage1_besides_compute"] > 0


def test_latency_split_reads_the_runtime_of_every_task_it_timed(benchmarks):
    result = finished(benchmarks, "latency").json("latency-cpu-tiny.json")
    # The worker's log held a runtime for every request (warm-up too) and no-op: the split read the right tasks
    assert result["succeeded_lines"] == {"request": 1 + 5, "noop": 5}
    request, noop = result["request_ms"], result["noop_ms"]
    assert 0 < request["compute"] <= request["task"] <= request["round_trip"]
    assert 0 < noop["task"] <= noop["round_trip"]


def test_job_cost_each_kind_ran_through_the_worker_and_its_device_process_and_the_two_stage_job_moved_the_most_bytes(benchmarks):
    rows = {row["kind"]: row for row in finished(benchmarks, "job_cost").json("job-cost-tiny.json")["rows"]}
    assert list(rows) == ["1 document", "10 passages", "100-paper two-stage"]
    for row in rows.values():
        assert row["compute_ms"] > 0 and row["round_trip_ms"] >= row["compute_ms"]  # the simulated device slept for each
        assert set(row["worker_cpu_ms"]) == {"parent", "hosts", "device"}
        assert row["redis"]["calls"], row
    # /proc counts CPU in 10 ms ticks: over two jobs only the two-stage job's tokenizing is sure to span several
    assert rows["100-paper two-stage"]["worker_cpu_ms"]["hosts"] > 0
    assert rows["100-paper two-stage"]["redis"]["bytes_in"] > rows["10 passages"]["redis"]["bytes_in"] > rows["1 document"]["redis"]["bytes_in"]


def test_score_cache_warm_runs_took_every_pair_from_the_cache_and_ran_no_forward_pass(benchmarks):
    result = finished(benchmarks, "score_cache").json("score-cache-cpu-tiny.json")
    cold, warm = result["cold"], result["warm"]
    # The cold run scored every pair of the shipped job with the model, on an empty cache
    assert cold["cached_pairs"] == 0 and cold["batches"] > 0 and cold["forward_ms"] > 0
    assert cold["by_stage"]["documents"]["pairs"] == 100 and cold["by_stage"]["chunks"]["pairs"] > 0
    # Each warm run took every pair from the cache, ran no forward pass, and its logits were the cold run's (or it exits 1)
    assert len(warm) == 2 and result["identical_logits"]
    for row in warm:
        assert row["cached_pairs"] == row["pairs"] == cold["pairs"] and row["batches"] == 0 and row["forward_ms"] == 0


def test_sweep_budgets_change_the_batches_and_the_compiled_module_ran_every_batch(benchmarks):
    result = finished(benchmarks, "sweep").json("sweep-cpu-tiny-compile-default.json")
    rows = {(r["budget"], r["corpus"]): r for r in result["rows"]}
    for corpus in ("docs", "chunks"):
        small, large = rows[512, corpus], rows[2048, corpus]
        # Each budget was the scheduler's, and it changed the batches: none held more than its budget
        assert small["scheduler_budget"] == 512 and large["scheduler_budget"] == 2048
        assert small["batches"] > large["batches"]
        for row in (small, large):
            assert row["padded_tokens"] <= row["batches"] * row["budget"] and row["attention"] == "padded"
            # The compiled module ran every batch (a warm-up and a timed run), each through a compiled graph
            assert row["compiled_module_calls"] == 2 * row["batches"]
            assert row["compiled_graph_runs"] >= row["compiled_module_calls"]
    compiled = result["compile"]
    assert compiled["backend"] == "eager" and compiled["target"].startswith("PaddedForward")
    assert compiled["graphs_compiled"] >= 1 and compiled["max_abs_logit_delta"] < 1e-4


def test_fresh_shapes_padded_widths_round_up_to_the_pad_multiple(benchmarks):
    lines = (finished(benchmarks, "fresh_shapes").out / "fresh-shapes-cpu-tiny.jsonl").read_text().splitlines()
    row = json.loads(lines[-1])
    # Padded batches whose widths were rounded up to multiples of the pad multiple asked for
    assert row["attention"] == "padded" and row["pad_multiple"] == 64
    assert len(row["new_widths_ms"]) == len(row["same_again_ms"]) == 2
    for tokens, padded in zip(row["tokens"], row["padded_tokens"]):
        assert padded % 64 == 0 and padded > tokens


def test_profile_forward_profiles_one_packed_score_of_the_docs(benchmarks):
    run = finished(benchmarks, "profile_forward")
    result = run.json("profile-cpu-tiny.json")
    # One score of the 4 docs, packed: attention ran once per pair and layer, nothing more
    assert result["attention"] == "packed" and result["batches"] >= 1
    from worker.synthetic import SHAPES

    assert result["operators"]["aten::scaled_dot_product_attention"]["count"] == 4 * SHAPES["tiny"].layers
    assert f"{result['tokens']} tokens in {result['batches']} batches" in (run.out / "profile-cpu-tiny.md").read_text()


# -- the folder and the GPU script -----------------------------------------------------------------


def benchmark_modules() -> set[str]:
    """Modules of benchmarks/ with a `main`: the entry points users run."""
    return {path.stem for path in (ROOT / "benchmarks").glob("*.py") if re.search(r"^def main\(", path.read_text(), re.MULTILINE)}


def test_every_benchmark_entry_point_has_a_test_here():
    assert benchmark_modules() == set(COMMANDS)
    tested = {benchmark_of(name) for name in globals() if name.startswith("test_")}
    assert tested >= set(COMMANDS)


def gpu_check_invocations() -> list[tuple[str, list[str]]]:
    """Every `"$PY" -m benchmarks.<module> <options>` in benchmarks/gpu_check.sh, its options expanded by bash with the script's defaults."""
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    joined = script.replace("\\\n", " ")
    defaults = "\n".join(re.findall(r"^[A-Z_]+=\$\{[A-Z_]+:-[^}]*\}$", script, re.MULTILINE))
    # The optional parts at their fullest: Redis rows and the baseline engine on.
    setup = f'{defaults}\nE2E=--e2e\nBASELINE=(--baseline-engine "$BASELINE_REV")\n'
    found = []
    for module, options in re.findall(r'"\$PY" -m benchmarks\.(\w+)(.*)$', joined, re.MULTILINE):
        expanded = subprocess.run(["bash", "-c", f'{setup}printf "%s\\0" {options}'], capture_output=True, text=True, check=True).stdout
        found.append((module, expanded.split("\0")[:-1]))
    return found


def test_gpu_check_is_valid_bash_and_every_invocation_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)
    invocations = gpu_check_invocations()
    assert {module for module, _ in invocations} == {"attention", "profile_forward", "fleet_throughput", "chain_overhead", "run"}
    for module, options in invocations:
        parser = importlib.import_module(f"benchmarks.{module}").parser()
        try:
            parser.parse_args(options)
        except SystemExit:
            pytest.fail(f"benchmarks.{module} rejects the options gpu_check.sh gives it: {options}")
