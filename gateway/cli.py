"""`rerank-gateway`: serve the HTTP API on uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys

from gateway.settings import GatewaySettings


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and serve until stopped."""
    parser = argparse.ArgumentParser(
        prog="rerank-gateway",
        description="Serve Cohere (/v1/rerank, /v2/rerank), Jina and TEI (/rerank) re-ranking from the Celery fleet. "
        "Configured by RERANK_* (broker, default model, limits) and RERANK_GATEWAY_* (keys, limits, timeouts).",
    )
    parser.add_argument("--host", help="address to listen on (RERANK_GATEWAY_HOST)")
    parser.add_argument("--port", type=int, help="port to listen on (RERANK_GATEWAY_PORT)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    try:
        import uvicorn

        from gateway.app import create_app
        from gateway.connections import ACCEPT_BATCH, Server, bound_logs, connection_limit, protocol
    except ImportError as e:
        print(f"rerank-gateway needs its extra: pip install 'bge-rerank-celery[gateway]' ({e})", file=sys.stderr)
        return 2
    # The gateway's own lines (revocations, an unreachable broker) beside uvicorn's.
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    try:
        gateway = GatewaySettings(**overrides)
        app = create_app(gateway=gateway)
    except ValueError as e:  # pydantic's ValidationError is one; messages hide the input (it may be a key)
        print(f"rerank-gateway: {e}", file=sys.stderr)
        return 2
    # Idle connections outlive clients' own keep-alive (httpx 5 s, Go 90 s): a server that closes first races a
    # client reusing the connection, which then sees a reset instead of an answer.
    config = uvicorn.Config(
        app, host=gateway.host, port=gateway.port, log_level=args.log_level, server_header=False, date_header=False, timeout_keep_alive=120,
        http=protocol(connection_limit(gateway.max_connections, gateway.threads), gateway.head_timeout), backlog=ACCEPT_BATCH,
    )
    bound_logs()  # after uvicorn configured its loggers
    Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
