"""JSON only, Redis passwords and TLS through the broker URL, and no secret in logs or results."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import pytest
from kombu.exceptions import ContentDisallowed
from kombu.serialization import dumps, loads

from producer import BrokerUnavailable, RerankClient, Settings
from producer.app import create_app
from tests.helpers import QUERY, RedisServer, WorkerFleet, candidates, need_binary


def test_producer_and_worker_accept_json_only():
    # Given the app producers and workers build from the same settings
    app = create_app(Settings(broker_url="redis://127.0.0.1:1/0"))
    # Then tasks and results are written as JSON and nothing else is read
    assert (app.conf.task_serializer, app.conf.result_serializer) == ("json", "json")
    assert app.conf.accept_content == ["json"] and app.conf.result_accept_content == ["json"]
    content_type, encoding, body = dumps({"a": 1}, serializer="pickle")
    with pytest.raises(ContentDisallowed):
        loads(body, content_type, encoding, accept=app.conf.accept_content)
    # (tests/test_bad_input.py sends a pickle to a real worker and checks it is never unpickled)


def every_value(redis) -> str:
    """Everything stored in a Redis database, as text: task messages, results, bookkeeping."""
    stored = []
    for key in redis.scan_iter():
        kind = redis.type(key)
        if kind == b"string":
            stored.append(redis.get(key))
        elif kind == b"list":
            stored.extend(redis.lrange(key, 0, -1))
        elif kind == b"hash":
            stored.extend(v for kv in redis.hgetall(key).items() for v in kv)
        elif kind == b"set":
            stored.extend(redis.smembers(key))
        elif kind == b"zset":
            stored.extend(m for m, _ in redis.zrange(key, 0, -1, withscores=True))
    return "\n".join(v.decode(errors="replace") for v in stored)


def serve_one_job(fleet: WorkerFleet, url: str, tiny_model: Path, password: str, caplog) -> None:
    """Start a worker on `url`, run a job through it, and check the password leaked nowhere."""
    worker = fleet.start("-c", "1", env={"RERANK_BROKER_URL": url}, name="secure")
    worker.wait_until_loaded(processes=1)
    client = RerankClient(Settings(broker_url=url, model=str(tiny_model)))
    result = client.two_stage(QUERY, candidates(6), top_k_docs=2, timeout=60)
    assert len(result.documents.items) == 2 and result.documents.info.worker.startswith("secure")
    with client.app.connection_for_write() as connection:
        stored = every_value(connection.default_channel.client)
    assert '"status": "SUCCESS"' in stored and QUERY in stored, "the scan saw the stored results"
    for where, text in {"worker log": worker.output(), "result": result.model_dump_json(), "Redis": stored, "producer log": caplog.text}.items():
        assert password not in text, f"the password appears in the {where}"
    assert ":**@127.0.0.1" in worker.output(), "the worker names its broker with the password masked"


@pytest.mark.integration
def test_a_password_protected_redis_works_through_the_url_and_the_password_leaks_nowhere(tmp_path, tiny_model, caplog):
    # Given a Redis that requires a password
    password = "pw-" + secrets.token_hex(12)
    server = RedisServer(tmp_path)
    server.start("--requirepass", password)
    fleet = WorkerFleet(tmp_path, tiny_model, f"redis://:{password}@127.0.0.1:{server.port}/0")
    try:
        # When a worker and a producer use it with the password in the URL, Then a job runs,
        # and the password is in no log, result or stored message
        serve_one_job(fleet, fleet.broker_url, tiny_model, password, caplog)

        # And a wrong password fails as BrokerUnavailable saying the password was refused (not that
        # Redis cannot be reached), naming the setting, without repeating the password, both when
        # following a job and when submitting one
        wrong = "wrong-" + secrets.token_hex(8)
        wrong_url = f"redis://:{wrong}@127.0.0.1:{server.port}/0"
        client = RerankClient(Settings(broker_url=wrong_url, model=str(tiny_model)))
        with pytest.raises(BrokerUnavailable, match=r"redis://:\*\*@127.0.0.1") as caught:
            client.job("any-job").status()
        assert "invalid username-password pair" in str(caught.value) or "WRONGPASS" in str(caught.value)
        with pytest.raises(BrokerUnavailable, match=r"redis://:\*\*@127.0.0.1") as submitted:
            client.submit("apixaban dosing", [{"id": "p1", "title": "Apixaban", "text": "Dosing in kidney disease."}])
        for error in (caught.value, submitted.value):
            assert "refused the password" in str(error) and "RERANK_BROKER_URL" in str(error) and "cannot reach" not in str(error)
            assert wrong not in str(error)
        # And a worker given the wrong password refuses to start, exit code 2, saying so in one line
        refused = fleet.start(env={"RERANK_BROKER_URL": wrong_url}, name="wrongpass")
        assert refused.process.wait(timeout=90) == 2, refused.output()[-2000:]
        assert "refused the password" in refused.output() and "RERANK_BROKER_URL" in refused.output()
        assert wrong not in refused.output() and "Cannot connect" not in refused.output()
    finally:
        fleet.stop_all()
        server.stop()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it."""
    openssl = need_binary("openssl")
    out = tmp_path_factory.mktemp("tls")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=out, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca", "-keyout", "ca.key", "-out", "ca.crt")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    (out / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
        "-extfile", "ext.cnf", "-out", "server.crt")
    return out


@pytest.mark.integration
def test_tls_works_through_a_rediss_url_and_verifies_the_server(tmp_path, tiny_model, certificates, caplog):
    # Given a Redis that speaks only TLS (with a certificate from our own CA) and wants a password
    password = "pw-" + secrets.token_hex(12)
    server = RedisServer(tmp_path)
    server.start(
        "--port", "0", "--tls-port", str(server.port), "--tls-cert-file", str(certificates / "server.crt"),
        "--tls-key-file", str(certificates / "server.key"), "--tls-ca-cert-file", str(certificates / "ca.crt"),
        "--tls-auth-clients", "no", "--requirepass", password,
    )
    base = f"rediss://:{password}@127.0.0.1:{server.port}/0"
    verified = f"{base}?ssl_cert_reqs=required&ssl_ca_certs={certificates / 'ca.crt'}"
    fleet = WorkerFleet(tmp_path, tiny_model, verified)
    try:
        # When a worker and a producer name the CA in the rediss:// URL, Then a job runs over TLS
        serve_one_job(fleet, verified, tiny_model, password, caplog)

        # And a rediss:// URL that names no CA checks the server against the system CAs, which
        # do not know ours: the connection is refused instead of trusting any certificate
        with pytest.raises(BrokerUnavailable, match="certificate verify failed") as caught:
            RerankClient(Settings(broker_url=base, model=str(tiny_model))).job("any-job").status()
        assert password not in str(caught.value)
    finally:
        fleet.stop_all()
        server.stop()


@pytest.mark.parametrize("denied", [("-eval", "-evalsha"), ("-blmove",), ("-@pubsub",), ("-@keyspace", "+type", "+exists", "+ttl")])
def test_a_redis_user_without_a_command_the_service_needs_is_told_in_one_line_what_to_grant(tmp_path, tiny_model, denied):
    from redis import Redis

    from producer import permissions

    # Given a Redis whose default user may not run some command the service needs
    server = RedisServer(tmp_path)
    server.start("--user", "default", "on", "nopass", "~*", "&*", "+@all", *denied)
    try:
        # When the permissions are probed, Then each refused command is named, and the line says what to grant
        refused = permissions.missing(Redis.from_url(server.url))
        assert refused and all("NOPERM" in entry or "permission" in entry for entry in refused), refused
        line = permissions.advice("default", refused)
        assert line.startswith("the Redis user 'default' may not run ") and "ACL SETUSER default +" in line
        # And with everything allowed, nothing is refused
        Redis.from_url(server.url).execute_command("ACL", "SETUSER", "default", "+@all")
        assert permissions.missing(Redis.from_url(server.url)) == []
    finally:
        server.stop()


def test_a_worker_whose_redis_user_may_not_run_eval_stops_at_start_up_with_one_line_saying_what_to_grant(tmp_path, tiny_model):
    # Given a Redis whose user may not run scripts
    server = RedisServer(tmp_path)
    server.start("--user", "default", "on", "nopass", "~*", "&*", "+@all", "-eval", "-evalsha")
    fleet = WorkerFleet(tmp_path, tiny_model, server.url)
    try:
        # When a worker starts on it
        worker = fleet.start(name="acl")
        # Then it exits 2 (a setting to fix) before serving, with one line naming what is missing and the rule that grants it
        assert worker.process.wait(timeout=60) == 2
        lines = [line for line in worker.output().splitlines() if "may not run" in line]
        assert lines and "EVAL" in lines[0] and "ACL SETUSER default +eval +evalsha" in lines[0], worker.output()[-3000:]
        assert "Traceback" not in worker.output()
    finally:
        fleet.stop_all()
        server.stop()
