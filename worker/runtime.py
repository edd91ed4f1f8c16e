"""The engine each worker process loads once and every task then shares."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import torch
from celery import current_app
from transformers.utils import logging as hf_logging

from contract.errors import WorkerError
from contract.settings import Settings
from scoring.device import DeviceClient
from scoring.engine import Scorer, engine_for
from scoring.model import load_tokenizer
from scoring.threaded import ThreadedScorer
from scoring.tokens import PairTokenizer
from worker.device_process import DeviceProcess
from worker.score_cache import cached

log = logging.getLogger(__name__)

_lock = threading.Lock()
_engine: Scorer | None = None
_loads = 0
device_process: DeviceProcess | None = None
"""The device process this worker's parent started (RERANK_HOST_PROCESSES > 0); pool processes inherit it and connect to its address."""
model_files: str | None = None
"""With RERANK_SCORE_CACHE: the digest of a local model directory's files, computed once by the worker's parent (worker.score_cache.ScoreCacheStep)."""


def load_engine(settings: Settings, app: Any = None) -> Scorer:
    """Load the model described by `settings` into this process, once; with several tasks in hand, behind one device thread.

    With RERANK_SCORE_CACHE, the scorer (whatever its shape) sits behind the score cache in the
    Redis of `app`'s result backend (default: the current Celery app).
    """
    global _engine, _loads
    with _lock:
        if _engine is None:
            hf_logging.disable_progress_bar()
            scorer: Scorer
            if device_process is not None:
                # A host process runs no forward pass: torch's intra-op threads would only spin after its few small ops.
                torch.set_num_threads(1)
                pairs = PairTokenizer(load_tokenizer(settings.model, settings.model_revision), settings.model, settings.max_length)
                address = device_process.address
                scorer = DeviceClient(address.path, address.authkey, pairs, settings.task_time_limit)
            else:
                engine = engine_for(settings)
                scorer = ThreadedScorer(engine, settings.task_time_limit) if settings.tasks_in_hand > 1 else engine
            if settings.score_cache:
                try:
                    scorer = cached(scorer, settings, app or current_app, model_files)
                except ValueError as e:  # never serve without the cache that was asked for
                    raise WorkerError(f"the score cache cannot start: {e}") from e
            _engine = scorer
            _loads += 1
            facts = _engine.facts
            log.info(
                "model loaded: pid=%d model=%s device=%s dtype=%s attention=%s max_length=%d held by pid %d tasks_in_hand=%d loads=%d",
                os.getpid(), facts.name, facts.device, facts.dtype, facts.attention, facts.max_length, facts.pid,
                settings.tasks_in_hand, _loads,
            )
        return _engine


def model_loads() -> int:
    """How many times this process has loaded the model (1 in a healthy worker)."""
    return _loads
