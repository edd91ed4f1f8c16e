"""The HTTP routes: each validates, checks that the model is served and its queue not full, enqueues one job
through the producer's client, records which API key owns it, and waits for the answer while watching for
the client to leave. Every status a route can answer is in its OpenAPI entry (`gateway.errors.responses`)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import (
    AbstractAsyncContextManager,
    asynccontextmanager,
    nullcontext,
    suppress,
)
from functools import partial
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException

from contract import tracing
from contract.errors import InvalidRequest, RerankError, RerankTimeout, TaskTimedOut
from contract.schemas import RerankResult, TwoStageRequest, TwoStageResult
from contract.settings import Settings, get_settings
from gateway.announcements import Announcements
from gateway.errors import (
    ClientGone,
    Unprocessable,
    WaitTimedOut,
    error_response,
    responses,
)
from gateway.fleet import Fleet
from gateway.guard import Guard, load_keys
from gateway.metrics import GatewayMetrics, Measure
from gateway.openapi import EXAMPLE_JOB, JOB_ID, constrain
from gateway.owners import Owners
from gateway.settings import GatewaySettings
from gateway.shapes import (
    MODEL_NAME,
    CohereRequest,
    CohereResponse,
    TeiRank,
    TeiRequest,
    cohere_response,
    tei_response,
)
from producer.aio import Nap, wait
from producer.jobs import Finish, Handle, JobProgress

log = logging.getLogger(__name__)

_PASSAGE = re.compile(r"\bpassages\.(\d+)")
_RESULT = TypeAdapter(TwoStageResult | RerankResult)


class JobAccepted(BaseModel):
    """A job taken for later: follow it at `status_url` (`GET`), cancel and forget it there (`DELETE`)."""

    job_id: str
    id: str = Field(description="Deprecated: the same as `job_id`, kept for clients written before it.", json_schema_extra={"deprecated": True})
    status_url: str


class JobStatus(BaseModel):
    """Where a job stands, and its result once it finished (`GET /v1/jobs/{job_id}`)."""

    job_id: str
    id: str = Field(description="Deprecated: the same as `job_id`, kept for clients written before it.", json_schema_extra={"deprecated": True})
    state: str
    progress: JobProgress
    result: TwoStageResult | RerankResult | None = None
    error: str | None = None


class JobDeleted(BaseModel):
    """A job cancelled (when it had not finished) and forgotten: its id now answers 404."""

    job_id: str
    cancelled: bool = Field(description="False when the job had finished already.")


class Health(BaseModel):
    """The process answers."""

    status: str


class Readiness(BaseModel):
    """Whether the broker answers and a worker serves RERANK_MODEL on its queue."""

    ready: bool
    broker: bool
    workers_asked: bool
    model: str
    models_served: list[str]


JobId = Annotated[str, Path(pattern=JOB_ID, max_length=255, description="A job id as `POST /v1/jobs` answered it.")]
ModelName = Annotated[
    str | None, Query(pattern=MODEL_NAME, description="A model a worker serves (name, slug or alias); unset: RERANK_MODEL.")
]
Job = Annotated[TwoStageRequest, Body(openapi_examples={"evidence": {"summary": "Two papers, the best one's chunks", "value": EXAMPLE_JOB}})]
RERANK = responses(400, 401, 404, 408, 413, 422, 429, 502, 503, 504)
JOBS = responses(401, 404, 422, 502, 503)


def create_app(settings: Settings | None = None, gateway: GatewaySettings | None = None) -> FastAPI:
    """The gateway for the fleet behind `settings` (default: the ``RERANK_*`` environment), configured by `gateway`."""
    settings = settings or get_settings()
    gateway = gateway or GatewaySettings()
    if not settings.broker_url:
        raise ValueError("the gateway needs RERANK_BROKER_URL: it sends every job to the workers")
    if (settings.result_backend or settings.broker_url).partition("://")[0] not in ("redis", "rediss", "sentinel"):
        raise ValueError(
            "the gateway keeps jobs' owners beside their results, in Redis: set RERANK_RESULT_BACKEND to a redis://, rediss:// "
            "or sentinel:// URL (with RabbitMQ as the broker, the results still need a Redis)"
        )
    keys = load_keys(gateway)
    tracing.configure("rerank-gateway")  # FastAPI's own telemetry then opens a span per request, continuing a W3C traceparent
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Broker and backend calls block; the default executor (cores + 4 threads) would queue them.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(gateway.threads, thread_name_prefix="gateway"))
        app.state.fleet = Fleet(settings, gateway)
        app.state.owners = Owners(app.state.fleet.client(settings.model).sync.app, settings.result_expires)
        app.state.announcements = Announcements.for_url(settings.result_backend or settings.broker_url)
        if app.state.announcements is not None:
            await app.state.announcements.start()
        watching = asyncio.create_task(app.state.fleet.run())
        yield
        watching.cancel()
        with suppress(asyncio.CancelledError):
            await watching
        if app.state.announcements is not None:
            await app.state.announcements.close()

    app = FastAPI(
        title="rerank-gateway",
        summary="Cohere-, Jina- and TEI-compatible re-ranking served by the Celery fleet.",
        version="1",
        lifespan=lifespan,
    )
    bearer = [Depends(HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`."))]

    async def refuse(request: Request, error: Exception) -> Response:
        if isinstance(error, HTTPException) and error.status_code == 405:
            # Starlette's `Allow` names the methods of the first route of the path; it is served by all of them.
            methods = {m for r in app.routes if isinstance(r, APIRoute) and r.path_regex.match(request.url.path) for m in r.methods}
            error = HTTPException(405, error.detail, {"Allow": ", ".join(sorted(methods))})
        response, kind = error_response(error)
        request.state.error_kind = kind
        return response

    for kind in (RerankError, RequestValidationError, HTTPException):
        app.add_exception_handler(kind, refuse)

    async def score(
        request: Request, model: str | None, query: str, texts: list[str], top_k: int | None, logits: bool, field: str, **cut: Any
    ) -> tuple[str, RerankResult]:
        fleet: Fleet = request.app.state.fleet
        if len(texts) > gateway.max_documents:
            raise Unprocessable(
                f"{len(texts)} documents, over the limit of {gateway.max_documents} (RERANK_GATEWAY_MAX_DOCUMENTS); send fewer per request", field
            )
        served = await fleet.resolve(model)
        fleet.admit(served)
        client = fleet.client(served)
        try:
            handle = await asyncio.to_thread(partial(client.sync.submit_passages, query, texts, top_k, return_logits=logits, **cut))
        except InvalidRequest as e:
            raise _unprocessable(e, field) from e
        await request.app.state.owners.claim(handle.id, request.state.tenant)
        try:
            return handle.id, await answered(request, handle)
        except InvalidRequest as e:  # the worker refused it too
            raise _unprocessable(e, field) from e

    async def answered(request: Request, handle: Handle) -> Any:
        """Wait for `handle`'s result; revoke the job if the client leaves first, and turn a timeout into 504 with the job id."""
        async with _announced(request, handle) as nap:
            result = asyncio.ensure_future(wait(handle, gateway.wait_timeout, nap, announced=nap is not asyncio.sleep))
            gone = asyncio.ensure_future(_disconnected(request))
            try:
                await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
        if not result.done():
            result.cancel()
            await asyncio.to_thread(handle.backend.revoke, [handle.id])
            metrics.revoked.inc()
            log.info("revoked job %s: its client disconnected before the answer", handle.id)
            raise ClientGone(f"job {handle.id} was revoked: its client disconnected")
        try:
            return result.result()
        except TaskTimedOut:
            raise
        except RerankTimeout as e:
            raise WaitTimedOut(
                f"job {handle.id} gave no result within {gateway.wait_timeout}s (RERANK_GATEWAY_WAIT_TIMEOUT); it still runs: "
                f"GET /v1/jobs/{handle.id} for its result",
                handle.id,
            ) from e

    @app.post("/v2/rerank", response_model=CohereResponse, response_model_exclude_none=True, dependencies=bearer, tags=["rerank"], responses=RERANK)
    async def rerank_v2(body: CohereRequest, request: Request) -> Any:
        """Cohere v2: documents ranked best first, `relevance_score` a probability."""
        texts = body.texts()
        job_id, result = await score(
            request, body.model, body.query, texts, body.top_n, False, "documents", max_passage_tokens=body.max_tokens_per_doc
        )
        return cohere_response(job_id, result, texts, body, "2")

    @app.post("/v1/rerank", response_model=CohereResponse, response_model_exclude_none=True, dependencies=bearer, tags=["rerank"], responses=RERANK)
    async def rerank_v1(body: CohereRequest, request: Request) -> Any:
        """Cohere v1 and Jina: as v2, plus `model` and `usage` (tokens scored)."""
        texts = body.texts()
        job_id, result = await score(
            request, body.model, body.query, texts, body.top_n, False, "documents", max_passage_tokens=body.max_tokens_per_doc
        )
        return cohere_response(job_id, result, texts, body, "1")

    @app.post("/rerank", response_model=list[TeiRank], response_model_exclude_none=True, dependencies=bearer, tags=["rerank"], responses=RERANK)
    async def rerank_tei(body: TeiRequest, request: Request) -> Any:
        """text-embeddings-inference: a bare list best first; `raw_scores` gives logits."""
        _, result = await score(request, None, body.query, body.texts, None, body.raw_scores, "texts", truncate=body.cut())
        return tei_response(result, body)

    @app.post("/v1/evidence", response_model=TwoStageResult, dependencies=bearer, tags=["evidence"], responses={**RERANK, **responses(409)})
    async def evidence(body: Job, request: Request, model: ModelName = None) -> Any:
        """Our two-stage job (papers by title and abstract, then the kept papers' chunks), waited for."""
        job = await _submit(request, body, model)
        return await answered(request, job.sync)

    @app.post("/v1/jobs", response_model=JobAccepted, status_code=202, dependencies=bearer, tags=["jobs"], responses=responses(400, 401, 404, 408, 413, 422, 429, 503))
    async def submit(body: Job, request: Request, response: Response, model: ModelName = None) -> JobAccepted:
        """Enqueue a two-stage job and answer at once with its id; `Location` is where to follow it."""
        job = await _submit(request, body, model)
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        return JobAccepted(job_id=job.id, id=job.id, status_url=f"/v1/jobs/{job.id}")

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus, response_model_exclude_none=True, dependencies=bearer, tags=["jobs"], responses=JOBS)
    async def job_status(job_id: JobId, request: Request) -> JobStatus:
        """A job's state and, once finished, its result (a two-stage job's, or a rerank request's) or error."""
        await request.app.state.owners.check(job_id, request.state.tenant)
        client = request.app.state.fleet.client(settings.model)
        job = client.job(job_id)
        progress = await job.progress()
        status = JobStatus(job_id=job_id, id=job_id, state=progress.state, progress=progress)
        meta = await asyncio.to_thread(job.sync.backend.meta, job_id)
        if meta["status"] == "SUCCESS":
            try:
                return status.model_copy(update={"result": _RESULT.validate_python(meta["result"])})
            except ValidationError:
                return status.model_copy(update={"error": f"job {job_id} finished with something that is not a ranking; submit it again"})
        if meta["status"] in ("FAILURE", "REVOKED"):
            handle = Handle(job.sync.backend, job_id, Finish(RerankResult))
            handle.final = meta
            try:
                handle.decode()
            except RerankError as e:
                return status.model_copy(update={"error": str(e)})
        return status

    @app.delete("/v1/jobs/{job_id}", response_model=JobDeleted, dependencies=bearer, tags=["jobs"], responses=JOBS)
    async def cancel(job_id: JobId, request: Request) -> JobDeleted:
        """Cancel a job that has not finished, and forget it: its id answers 404 from now on."""
        await request.app.state.owners.check(job_id, request.state.tenant)
        cancelled = await request.app.state.fleet.client(settings.model).job(job_id).cancel()
        await request.app.state.owners.forget(job_id)
        return JobDeleted(job_id=job_id, cancelled=cancelled)

    @app.get("/health", response_model=Health, tags=["probes"])
    async def health() -> dict[str, str]:
        """Alive: the process answers."""
        return {"status": "ok"}

    @app.get("/ready", response_model=Readiness, tags=["probes"], responses={503: {"model": Readiness, "description": "Not ready (yet)."}})
    async def ready(request: Request) -> Response:
        """Ready: the broker answers and a worker serves RERANK_MODEL on its queue (503 otherwise)."""
        fleet: Fleet = request.app.state.fleet
        body = {
            "ready": fleet.ready, "broker": fleet.broker_up, "workers_asked": fleet.known.is_set(),
            "model": settings.model, "models_served": sorted(fleet.served.values()),
        }
        return JSONResponse(body, status_code=200 if fleet.ready else 503)

    @app.get("/metrics", response_class=PlainTextResponse, tags=["probes"], responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus() -> Response:
        """Prometheus: requests, latency, errors by kind, requests in flight."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def _submit(request: Request, body: TwoStageRequest, model: str | None) -> Any:
        fleet: Fleet = request.app.state.fleet
        served = await fleet.resolve(model)
        fleet.admit(served)
        options = {"min_score": body.min_score, "windows": body.windows, "max_passage_tokens": body.max_passage_tokens, "truncate": body.truncate}
        job = await fleet.client(served).submit(body.query, body.candidates, body.top_k_docs, body.top_k_chunks, **options)
        await request.app.state.owners.claim(job.id, request.state.tenant)
        return job

    app.add_middleware(Guard, keys=keys, max_body_bytes=gateway.max_body_bytes, body_timeout=gateway.body_timeout)
    app.add_middleware(Measure, metrics=metrics)
    app.openapi = partial(constrain, app, settings, gateway)  # type: ignore[method-assign]
    return app


def _announced(request: Request, handle: Handle) -> AbstractAsyncContextManager[Nap]:
    announcements: Announcements | None = request.app.state.announcements
    if announcements is None:
        return nullcontext(asyncio.sleep)
    return announcements.watching(handle.backend.app.backend.get_key_for_task(handle.id))


async def _disconnected(request: Request) -> None:
    # After the body, the server's receive() returns only once the client has gone.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _unprocessable(error: InvalidRequest, field: str) -> Unprocessable:
    """The producer's refusal, with its `passages.N` named as the client named it (`documents.N`, `texts.N`)."""
    message = _PASSAGE.sub(lambda m: f"{field}.{m.group(1)}", str(error))
    found = re.search(rf"\b{field}\.\d+", message)
    where = found.group() if found else ("query" if message.startswith("query") else field if field in message else None)
    return Unprocessable(message, where)
