"""The device process: one per GPU, it owns the model and the scheduler and does nothing but score.

Host processes (a worker's prefork children) decode messages, tokenize, rank and write results;
they hand the device process token ids and get logits back. Why this split: Python around a
GPU (Celery, Redis, JSON, validation, tokenizing, kernel launches) shares one interpreter lock,
so one process feeds a GPU with one core; here the device process's core only plans batches and
launches kernels, and every host process brings its own core (as vLLM's engine core and TEI's
router/backend split do).

How they meet:
- A Unix stream socket (`multiprocessing.connection`, HMAC-authenticated with a per-worker key)
  in a directory only the worker's user can open. A socket, not a pipe: host processes are forked
  by Celery after the device process starts and each connects on its own; not ZeroMQ: one more
  dependency for what the standard library frames and authenticates already.
- Shared memory for the token ids: each host process makes one anonymous memory file
  (`memfd_create`), sized for its largest request so far, and passes its descriptor once over the
  socket (SCM_RIGHTS); a request's ids are written there and only a small header crosses the
  socket. Nothing has a name, so nothing leaks when either side dies.
- The device process copies a request's ids out of the shared memory when it reads the request,
  and checks them (lengths, ids within the vocabulary) before they reach the model.

Nothing lost: a host process keeps its message unacknowledged until its logits are back. If the
device process dies, every host process waiting on it exits at once (code 1) and the worker
that started it exits non-zero, so Redis delivers every held task again; if a host process
dies, the device process drops its requests and serves the others.
"""

from __future__ import annotations

import argparse
import array
import logging
import mmap
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from multiprocessing import AuthenticationError
from multiprocessing.connection import (
    Client,
    Connection,
    answer_challenge,
    deliver_challenge,
)
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

import torch

from contract import tracing
from contract.errors import TaskTimedOut, WorkerError
from contract.settings import Settings
from scoring.engine import EMPTY, OnProgress, Scores, engine_for, tokenize_then_score
from scoring.facts import ModelFacts
from scoring.loop import DeviceLoop
from scoring.runner import Runner, device_memory
from scoring.scheduler import Request, UniquePairs
from scoring.tokens import EncodedPair, PairTokenizer, Truncation, joined
from scoring.wire import (
    Buffer,
    Cancel,
    Done,
    Failed,
    FromDevice,
    Hello,
    Progress,
    Score,
    frame,
    from_device,
    to_device,
)

log = logging.getLogger(__name__)

_INT = 4  # bytes of an int32 id or a float32 logit


# The device side -------------------------------------------------------------------------------


OUTBOX = 256
"""Messages (progress, results) a host process may leave unread before the device process cuts it off."""

HANDSHAKE_SECONDS = 5.0
"""How long a connection may take to prove it holds the key before the device process drops it."""


class _Host:
    """One connected host process: its socket, its shared buffer, its requests in flight, and what waits to be sent to it.

    Everything sent to a host goes through its own outbox and writer thread: a host that stops
    reading fills only its own outbox, and is then cut off, its requests failed, instead of
    holding up the device process's other hosts.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.buffer: mmap.mmap | None = None
        self.requests: dict[int, Request] = {}
        self.outbox: queue.Queue[bytes | None] = queue.Queue(OUTBOX)
        threading.Thread(target=self._write, name="device-host-writer", daemon=True).start()

    def send(self, message: FromDevice, payload: bytes = b"") -> None:
        """Queue `message` for this host; a host whose outbox is full is cut off."""
        try:
            self.outbox.put_nowait(frame(message, payload))
        except queue.Full:
            log.warning("a host process left %d messages unread; cutting it off (its requests fail, the others go on)", OUTBOX)
            self.cut_off()

    def cut_off(self) -> None:
        """End the connection from any thread: a writer blocked on it, and the reader, both return."""
        _shut(self.conn)

    def _write(self) -> None:
        while (data := self.outbox.get()) is not None:
            try:
                self.conn.send_bytes(data)
            except OSError:
                return  # the reader sees the connection end and fails its requests


class DeviceServer:
    """Serves scoring to host processes at a Unix socket, every request through one `DeviceLoop` on `runner`."""

    def __init__(self, runner: Runner, address: str, authkey: bytes, facts: ModelFacts) -> None:
        """Score on `runner`; listen at `address` for hosts holding `authkey`; `facts` (the loaded engine's) greet each host."""
        self.runner = runner
        self.authkey = authkey
        self.facts = facts
        self.vocab_size = facts.weights.architecture.vocab_size  # ids must lie below it
        self.max_length = facts.max_length
        self.device = torch.device(facts.device)
        self.loop = DeviceLoop(runner)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(address)
        self.listener.listen(64)
        self._owners: dict[Request, tuple[_Host, int]] = {}
        self._finished: queue.SimpleQueue[tuple[Request, _Host, int]] = queue.SimpleQueue()

    def serve_forever(self) -> None:
        """Accept hosts and send results on threads of their own; run batches on this one until the process is killed.

        Results leave from the sender thread: reading a request's logits waits for the device, and
        the loop must meanwhile plan and launch the next batch.
        """
        threading.Thread(target=self._accept, name="device-accept", daemon=True).start()
        threading.Thread(target=self._send_finished, name="device-send", daemon=True).start()
        self.loop.serve(after_step=self._report)

    def _send_finished(self) -> None:
        while True:
            request, host, ident = self._finished.get()
            try:
                self._send_outcome(request, host, ident)
            except Exception as e:  # noqa: BLE001 - one unreadable result fails its own request, and the thread goes on
                log.exception("could not read a finished request's logits")
                host.send(Failed(ident, "error", f"reading the logits failed: {e}"))

    def _accept(self) -> None:
        """Take connections; each proves it holds the key on a thread of its own, so none can hold up the next."""
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                log.warning("the device process could not accept a connection", exc_info=True)
                time.sleep(0.1)
                continue
            threading.Thread(target=self._greet, args=(Connection(sock.detach()),), name="device-host", daemon=True).start()

    def _greet(self, conn: Connection) -> None:
        """The key handshake, under a deadline (a silent peer is dropped), then this host's messages until it goes."""
        late = threading.Timer(HANDSHAKE_SECONDS, lambda: _shut(conn))
        late.start()
        try:
            deliver_challenge(conn, self.authkey)
            answer_challenge(conn, self.authkey)
        except (OSError, EOFError, AuthenticationError) as e:
            log.warning("a connection to the device process failed its handshake (%s); dropped", type(e).__name__)
            conn.close()
            return
        finally:
            late.cancel()
        self._read(_Host(conn))

    def _read(self, host: _Host) -> None:
        try:
            host.send(Hello(self.facts))
            while True:
                message, _ = to_device(host.conn.recv_bytes())
                match message:
                    case Buffer(size=size):
                        fd = recv_handle(host.conn)
                        with os.fdopen(fd, "rb", buffering=0) as file:  # the mapping keeps the memory; the descriptor can go
                            host.buffer = mmap.mmap(file.fileno(), size, prot=mmap.PROT_READ)
                    case Score():
                        self._admit(host, message)
                    case Cancel(id=ident):
                        with self.loop.changed:
                            request = host.requests.get(ident)
                            if request is not None:
                                request.fail(TaskTimedOut("cancelled by its host process"))
        except (EOFError, OSError):
            pass
        except Exception:  # noqa: BLE001 - a host that sends what we never send is cut off, alone
            log.exception("a host process sent a message the device process cannot read; closing its connection")
        finally:
            with self.loop.changed:
                for request in host.requests.values():
                    request.fail(WorkerError("the host process went away"))
                    self._owners.pop(request, None)
                host.requests.clear()
            host.cut_off()
            host.outbox.put(None)  # the writer ends (a full outbox: it already ended on the closed connection)
            host.conn.close()

    def _admit(self, host: _Host, score: Score) -> None:
        """Read a request's pairs out of the host's buffer, check them, and queue them."""
        try:
            pairs = self._pairs(host, score.count, score.tokens, score.types)
        except ValueError as e:
            host.send(Failed(score.id, "error", f"the device process refused the request: {e}"))
            return
        request = Request(deadline=time.monotonic() + score.seconds)
        request.add(pairs)
        with self.loop.changed:
            host.requests[score.id] = request
            self._owners[request] = (host, score.id)
        self.loop.submit(request)

    def _pairs(self, host: _Host, count: int, tokens: int, types: bool) -> list[EncodedPair]:
        if host.buffer is None or tokens < count:
            raise ValueError("no shared buffer, or fewer tokens than pairs")
        need = (count + tokens * (2 if types else 1)) * _INT
        if need > len(host.buffer):
            raise ValueError(f"{need} bytes of ids do not fit the {len(host.buffer)}-byte buffer")
        words = array.array("i")
        words.frombytes(host.buffer[:need])  # a copy: the host may reuse its buffer once it has the answer
        lengths, ids = words[:count], words[count : count + tokens]
        if min(lengths) < 1 or max(lengths) > self.max_length or sum(lengths) != tokens:
            raise ValueError(f"pair lengths must be 1..{self.max_length} and add up to {tokens}")
        if min(ids) < 0 or (self.vocab_size is not None and max(ids) >= self.vocab_size):
            raise ValueError(f"token ids must lie in 0..{self.vocab_size}")
        type_ids = words[count + tokens :] if types else None
        pairs, start = [], 0
        for length in lengths:
            end = start + length
            pairs.append(EncodedPair(ids[start:end], type_ids[start:end] if type_ids is not None else None))
            start = end
        return pairs

    def _report(self, touched: list[Request]) -> None:
        """After a step: results or errors of every finished request, progress of the others it touched."""
        with self.loop.changed:
            finished = [(request, *self._owners.pop(request)) for request in list(self._owners) if request.finished]
            for _, host, ident in finished:
                host.requests.pop(ident, None)
            progressed = [(request, *self._owners[request]) for request in dict.fromkeys(touched) if request in self._owners]
        for item in finished:
            self._finished.put(item)
        for request, host, ident in progressed:
            host.send(Progress(ident, request.done, request.total))

    def _send_outcome(self, request: Request, host: _Host, ident: int) -> None:
        if request.error is not None:
            kind = "timeout" if isinstance(request.error, TaskTimedOut) else "error"
            host.send(Failed(ident, kind, str(request.error)))
            return
        logits = array.array("f", request.pairs.in_input_order()).tobytes()
        host.send(Done(ident, request.padded, request.batches, request.splits, device_memory(self.device)), logits)


# The host side ---------------------------------------------------------------------------------


class DeviceClient:
    """A `Scorer` in a host process: tokenizes here, scores in the device process."""

    def __init__(self, address: str, authkey: bytes, tokenize: PairTokenizer, time_limit: float,
                 on_lost: Callable[[], None] | None = None) -> None:
        """Connect to the device process at `address`; `on_lost` runs if it goes away (default: exit with code 1)."""
        from scoring.threaded import exit_worker

        self.tokenize = tokenize
        self.time_limit = time_limit
        self.on_lost = on_lost or exit_worker
        self.conn = Client(address, family="AF_UNIX", authkey=authkey)
        hello, _ = self._receive()
        if not isinstance(hello, Hello):
            raise WorkerError(f"the device process greeted with {type(hello).__name__}, not Hello")
        self.facts: ModelFacts = hello.facts
        self._buffer: mmap.mmap | None = None
        self._next_id = 0
        self._device_memory: dict[str, Any] = {}

    def device_memory(self) -> dict[str, Any]:
        """What the device process held on its GPU when it last returned logits (this process holds none)."""
        return dict(self._device_memory)

    def score(
        self, query: str, passages: Sequence[str], on_batch: OnProgress | None = None, truncation: Truncation | None = None
    ) -> Scores:
        """Tokenize here, score in the device process; `on_batch(pairs done, pairs total)` follows its batches."""
        return tokenize_then_score(self, query, passages, on_batch, truncation)

    def score_pairs(self, pairs: Sequence[EncodedPair], on_batch: OnProgress | None = None) -> Scores:
        """Score pairs already tokenized in the device process; `on_batch(pairs done, pairs total)` follows its batches."""
        if not pairs:
            return EMPTY
        started = time.perf_counter()
        # The forward passes run in the device process, which no trace reaches: the span is this process's wait for them.
        with tracing.span("rerank.forward", where="device process"):
            # Repeats are sent once (the scheduler would score them once anyway), and copied back here.
            once = UniquePairs()
            once.add(pairs)
            ident = self._send_request(once.unique)
            done, payload = self._wait(ident, on_batch, time.monotonic() + self.time_limit)
        by_unique = array.array("f")
        by_unique.frombytes(payload)
        if len(by_unique) != len(once.unique):
            raise WorkerError(f"the device process returned {len(by_unique)} logits for {len(once.unique)} pairs")
        logits = [by_unique[i] for i in once.owner]
        return Scores(logits, sum(len(p.input_ids) for p in pairs), done.padded, done.batches,
                      0.0, time.perf_counter() - started, done.splits)

    def _send_request(self, pairs: list[EncodedPair]) -> int:
        lengths = [len(p.input_ids) for p in pairs]
        types = self.tokenize.uses_type_ids
        words = array.array("i", lengths) + joined(pairs)
        if types:
            words += joined(pairs, types=True)
        data = memoryview(words).cast("B")
        if self._buffer is None or len(self._buffer) < len(data):
            self._grow(len(data))
        self._buffer[: len(data)] = data
        self._next_id += 1
        self._send(Score(self._next_id, len(pairs), sum(lengths), types, float(self.time_limit)))
        return self._next_id

    def _grow(self, need: int) -> None:
        size = max(need, 2 * len(self._buffer) if self._buffer is not None else 1 << 20)
        fd = os.memfd_create("rerank-host-ids")
        try:
            os.ftruncate(fd, size)
            buffer = mmap.mmap(fd, size)
            self._send(Buffer(size))
            send_handle(self.conn, fd, 0)
        finally:
            os.close(fd)
        if self._buffer is not None:
            self._buffer.close()
        self._buffer = buffer

    def _wait(self, ident: int, on_batch: OnProgress | None, deadline: float) -> tuple[Done, memoryview]:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._poll(left):
                self._send(Cancel(ident))
                raise TaskTimedOut(
                    f"scoring waited past RERANK_TASK_TIME_LIMIT ({self.time_limit:g}s); send fewer or shorter texts "
                    "per request, or raise the limit"
                )
            message, payload = self._receive()
            if getattr(message, "id", None) != ident:
                continue  # the answer to a request this process gave up on
            match message:
                case Progress(done=done, total=total) if on_batch is not None:
                    on_batch(done, total)
                case Done():
                    self._device_memory = dict(message.memory)
                    return message, payload
                case Failed(kind=kind, message=text):
                    raise (TaskTimedOut if kind == "timeout" else WorkerError)(text)

    def _poll(self, seconds: float) -> bool:
        try:
            return self.conn.poll(seconds)
        except (EOFError, OSError):
            self._lost()
            raise

    def _send(self, message: Buffer | Score | Cancel) -> None:
        try:
            self.conn.send_bytes(frame(message))
        except OSError:
            self._lost()
            raise

    def _receive(self) -> tuple[FromDevice, memoryview]:
        try:
            raw = self.conn.recv_bytes()
        except (EOFError, OSError):
            self._lost()
            raise
        return from_device(raw)

    def _lost(self) -> None:
        log.critical("the device process is gone; this host process exits so that its task is delivered again")
        self.on_lost()
        raise WorkerError("the device process is gone; the task is delivered again")


# The process -----------------------------------------------------------------------------------


def _shut(conn: Connection) -> None:
    """Shut a connection's socket down from any thread: whoever is blocked reading or writing it returns."""
    with suppress(OSError):
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:  # shutdown acts on the socket, whichever fd names it
            sock.shutdown(socket.SHUT_RDWR)


def main(argv: list[str] | None = None) -> None:
    """`python -m scoring.device --address PATH`: load the model, listen, print `ready`, serve until killed.

    Standard input holds two lines: the HMAC key (hex), then the worker's settings as JSON
    (`Settings.model_dump_json()`); nothing is read from the environment.
    """
    parser = argparse.ArgumentParser(prog="python -m scoring.device", description=main.__doc__)
    parser.add_argument("--address", required=True, help="Unix socket path to listen on.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/device %(process)d] %(message)s")
    authkey = bytes.fromhex(sys.stdin.readline().strip())
    settings = Settings.model_validate_json(sys.stdin.readline())
    engine = engine_for(settings)
    facts = engine.facts
    server = DeviceServer(engine.runner, args.address, authkey, facts)
    log.info("device process ready: pid=%d model=%s device=%s address=%s", os.getpid(), facts.name, facts.device, args.address)
    print("ready", flush=True)
    os.dup2(2, 1)  # nobody reads the pipe after "ready": whatever a library prints goes to the log, not into a full pipe
    server.serve_forever()


if __name__ == "__main__":
    main()
