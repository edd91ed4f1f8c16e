"""The channel between host processes and a device process: scores as in-process, and what a host sends cannot stop it."""

from __future__ import annotations

import mmap
import os
import secrets
import threading
from multiprocessing.connection import Client, Listener
from multiprocessing.reduction import recv_handle, send_handle

import pytest

from contract.errors import WorkerError
from scoring.device import DeviceClient, DeviceServer
from scoring.engine import CrossEncoderEngine
from scoring.wire import Buffer, Failed, Hello, Score, frame, from_device, to_device
from tests.helpers import CORPUS, QUERY


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """A device server on a tiny model, serving on a thread; its address, key and the in-process engine."""
    engine = CrossEncoderEngine.load(str(tiny_model), attention="packed")
    address = str(tmp_path_factory.mktemp("device") / "device.sock")
    key = secrets.token_bytes(16)
    server = DeviceServer(engine.runner, address, key, engine.facts)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return address, key, engine


def client_of(served, on_lost=None) -> DeviceClient:
    address, key, engine = served
    return DeviceClient(address, key, engine.tokenize, time_limit=30, on_lost=on_lost or (lambda: None))


def test_scores_through_the_device_process_are_the_in_process_scores(served):
    # Given two host clients sharing the device process
    _, _, engine = served
    first, second = client_of(served), client_of(served)
    passages = CORPUS[:12] + CORPUS[:3]  # repeats are sent once and copied back
    # When each scores, one after the other and at once
    results = {}
    threads = [threading.Thread(target=lambda c=c, n=n: results.__setitem__(n, c.score(f"{QUERY} {n}", passages))) for n, c in enumerate([first, second])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    progress = []
    alone = first.score(QUERY, passages, on_batch=lambda done, total: progress.append((done, total)))
    # Then the logits are the engine's own, in input order, repeats identical
    for n in (0, 1):
        assert results[n].logits == pytest.approx(engine.score(f"{QUERY} {n}", passages).logits, abs=1e-5)
    assert alone.logits == pytest.approx(engine.score(QUERY, passages).logits, abs=1e-5)
    assert alone.logits[12:] == alone.logits[:3]
    assert first.facts == engine.facts and first.facts.pid == os.getpid() and first.facts.device == "cpu"


def hostile_connection(served):
    address, key, _ = served
    conn = Client(address, family="AF_UNIX", authkey=key)
    assert isinstance(from_device(conn.recv_bytes())[0], Hello)
    return conn


def buffer_for(conn, words: list[int]) -> None:
    fd = os.memfd_create("test-ids")
    os.ftruncate(fd, 4096)
    with mmap.mmap(fd, 4096) as buffer:
        buffer[: 4 * len(words)] = b"".join(w.to_bytes(4, "little", signed=True) for w in words)
    conn.send_bytes(frame(Buffer(4096)))
    send_handle(conn, fd, 0)
    os.close(fd)


@pytest.mark.parametrize("words, header, refusal", [
    ([3, 2, 5, 6], {"count": 1, "tokens": 2}, "lengths must be"),             # lengths do not add up to the tokens
    ([2, 5, 999_999], {"count": 1, "tokens": 2}, "token ids must lie"),        # an id outside the vocabulary
    ([2, -4, 5], {"count": 1, "tokens": 2}, "token ids must lie"),             # a negative id
    ([0, 5], {"count": 1, "tokens": 1}, "lengths must be"),                    # an empty pair
    ([2, 5, 6], {"count": 1, "tokens": 10**9}, "do not fit"),                  # more ids than the buffer holds
])
def test_a_request_the_device_process_cannot_trust_is_refused_and_it_serves_on(served, words, header, refusal):
    conn = hostile_connection(served)
    buffer_for(conn, words)
    conn.send_bytes(frame(Score(7, header["count"], header["tokens"], False, 5.0)))
    reply, _ = from_device(conn.recv_bytes())
    assert isinstance(reply, Failed) and reply.id == 7 and refusal in reply.message
    _, _, engine = served
    assert client_of(served).score(QUERY, CORPUS[:4]).logits == pytest.approx(engine.score(QUERY, CORPUS[:4]).logits, abs=1e-5)


HOSTILE_HEADERS = [
    b"no header at all", b"[1,2]\0", b"{}\0", b"\xff" * 5000, b"{\"type\": \"score\"}\0",  # not a message, no fields
    b"{\"type\": \"hello\", \"facts\": {}}\0",  # the device's own op, sent to it
    b"{\"type\": \"launch\", \"id\": 1}\0",  # an op nobody defined
    b"{\"type\": \"score\", \"id\": \"7\", \"count\": 1, \"tokens\": 2, \"types\": false, \"seconds\": 5}\0",  # an id that is a string
    b"{\"type\": \"score\", \"id\": -7, \"count\": 1, \"tokens\": 2, \"types\": false, \"seconds\": 5}\0",  # a negative id
    b"{\"type\": \"score\", \"id\": 7, \"count\": 1, \"tokens\": 2, \"types\": false, \"seconds\": 1e308}\0",  # a deadline past any limit
    b"{\"type\": \"buffer\", \"size\": 1e400}\0",  # a number JSON cannot hold
    b"{\"type\": \"buffer\", \"size\": 99999999999999999999}\0",  # a buffer larger than any
    b"{\"type\": \"cancel\"" + b" " * 5000 + b"}\0",  # a header past the limit
]


@pytest.mark.parametrize("raw", HOSTILE_HEADERS)
def test_a_message_the_device_process_cannot_read_closes_that_connection_alone(served, raw):
    conn = hostile_connection(served)
    conn.send_bytes(raw)
    with pytest.raises(EOFError):
        conn.recv_bytes()
    _, _, engine = served
    assert client_of(served).score(QUERY, CORPUS[:4]).logits == pytest.approx(engine.score(QUERY, CORPUS[:4]).logits, abs=1e-5)


def test_a_wrong_key_is_refused_before_anything_is_read(served):
    address, _, _ = served
    from multiprocessing import AuthenticationError

    with pytest.raises(AuthenticationError):
        Client(address, family="AF_UNIX", authkey=b"not the key")


def test_a_client_whose_device_process_is_gone_says_so(served, tmp_path):
    # Given a device "process" that greets, takes one request and goes away
    address, key = str(tmp_path / "gone.sock"), b"k"
    listener = Listener(address, family="AF_UNIX", authkey=key)
    _, _, engine = served

    def greet_and_close():
        conn = listener.accept()
        conn.send_bytes(frame(Hello(engine.facts)))
        while not isinstance(to_device(conn.recv_bytes())[0], Score):
            recv_handle(conn)
        conn.close()

    threading.Thread(target=greet_and_close, daemon=True).start()
    lost = []
    client = DeviceClient(address, key, engine.tokenize, time_limit=5, on_lost=lambda: lost.append(True))
    # When a request is in flight as it goes
    # Then the client says the device process is gone (a worker's host process would exit here), not a timeout
    with pytest.raises(WorkerError, match="device process is gone"):
        client.score(QUERY, CORPUS[:3])
    assert lost == [True]


def latencies(client: DeviceClient, count: int) -> list[float]:
    """Seconds each of `count` small requests took through `client`, one after the other."""
    import time

    taken = []
    for n in range(count):
        started = time.perf_counter()
        client.score(f"{QUERY} {n}", CORPUS[n % 20 : n % 20 + 3])
        taken.append(time.perf_counter() - started)
    return taken


def test_a_connection_that_never_answers_the_handshake_holds_up_nobody(served):
    import socket
    import time

    from scoring.device import HANDSHAKE_SECONDS

    # Given connections that open the socket and then say nothing, as a stuck or hostile peer would
    address, _, engine = served
    silent = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(20)]
    for sock in silent:
        sock.connect(address)
    # When a host process connects after them, Then it is greeted and served at once
    started = time.monotonic()
    client = client_of(served)
    assert client.score(QUERY, CORPUS[:4]).logits == pytest.approx(engine.score(QUERY, CORPUS[:4]).logits, abs=1e-5)
    assert time.monotonic() - started < 2
    # And the silent ones are dropped once the handshake's deadline passes
    for sock in silent:
        sock.settimeout(HANDSHAKE_SECONDS + 10)
        while sock.recv(4096):  # the challenge, then the end of the connection
            pass
        sock.close()


def test_a_host_that_never_reads_its_results_cannot_slow_the_others_and_is_cut_off(served):
    import statistics
    import time

    from scoring.device import OUTBOX

    # Given a well-behaved host's latency alone
    good = client_of(served)
    alone = latencies(good, 20)
    # When another host sends request after request and never reads an answer
    conn = hostile_connection(served)
    buffer_for(conn, [3, 5, 6, 7])  # one pair of three ids, within the tiny model's vocabulary
    sent, beside, cut = 0, [], False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not cut:
        try:
            for _ in range(50):
                conn.send_bytes(frame(Score(1_000 + sent, 1, 3, False, 30.0)))
                sent += 1
        except OSError:  # the device process shut the connection down: sending fails
            cut = True
        beside += latencies(good, 2)
    # Then the others keep their latency, and the host that never reads is cut off
    assert statistics.median(beside) <= 2 * statistics.median(alone) + 0.005, (statistics.median(alone), statistics.median(beside))
    assert cut, f"the device process kept answering {sent} requests to a host that never reads (outbox {OUTBOX})"
    _, _, engine = served
    assert good.score(QUERY, CORPUS[:4]).logits == pytest.approx(engine.score(QUERY, CORPUS[:4]).logits, abs=1e-5)


def test_every_worker_shape_reports_the_time_it_spent_tokenizing(served):
    # Given every way a worker scores: in the calling thread (CPU), in slices tokenized on a thread
    # (GPU), behind a device thread (threads pool) and behind the device process (host processes)
    from scoring.threaded import ThreadedScorer

    _, _, engine = served
    sliced = CrossEncoderEngine(engine.tokenize, engine.runner, tokenize_slice=40)
    shapes = {"engine": engine, "sliced": sliced, "threaded": ThreadedScorer(engine, time_limit=60), "device process": client_of(served)}
    passages = [" ".join(CORPUS[i % 40 : i % 40 + 8]) + f" {i}" for i in range(400)]
    # and the time the tokenizer alone takes on those passages (the least of three tries)
    alone = min(_timed(lambda: engine.tokenize(QUERY, passages)) for _ in range(3))
    for name, scorer in shapes.items():
        # When each scores them
        took = _timed(lambda: scorer.score(QUERY, passages))
        scores = scorer.score(QUERY, passages)
        # Then its tokenize time is that of tokenizing (at least half what the tokenizer alone
        # takes, where waiting for tokens read near 0), and no more than the whole call
        assert alone / 2 <= scores.tokenize_seconds <= max(took, alone) * 3, (name, scores.tokenize_seconds, alone, took)
        assert scores.forward_seconds > 0, name


def _timed(call) -> float:
    import time

    started = time.perf_counter()
    call()
    return time.perf_counter() - started
