"""The score cache: a pair scored before, by this fleet's model as configured here, is not scored again.

`UniquePairs` scores a request's repeated pairs once; this is the same idea across requests. It
sits where a request's tokenized pairs meet the scheduler, so every worker shape (in-process
engine, threads, host processes of a device process) caches the same way: `CachedScorer` wraps a
scorer, tokenizes, looks every pair up in one read, has only the misses scored, and writes their
logits in one write.

A pair's key is an HMAC, under the fleet's secret, of everything that decides its logit: the
fingerprint of the model as it serves (name, revision or a digest of a local directory's files,
dtype, attention, device kind, max length, torch and transformers versions) and the pair's token
ids, which already hold the query, the passage, the template and any truncation. Equal keys are
equal inputs to the same computation, by construction; nobody without the secret can tell which
pair a key stands for. An entry's value is the fp32 logit and an HMAC of key and logit, so an
entry that anyone planted, altered or copied from another key fails the check and is scored afresh
(and counted as refused). Where entries live, how long and how many is the store's business
(worker/score_cache.py keeps them in Redis).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from scoring.engine import EMPTY, OnProgress, Scorer, Scores, tokenize_then_score
from scoring.facts import ModelFacts
from scoring.tokens import EncodedPair, Truncation

log = logging.getLogger(__name__)

KEY_BYTES = 16
"""Bytes of a pair's key (a truncated HMAC-SHA256)."""

VALUE_BYTES = 4 + 16
"""Bytes of an entry: the fp32 logit, then 16 bytes of HMAC-SHA256 over key and logit."""


class ScoreStore(Protocol):
    """Where entries live: read and written in one round trip per request."""

    def read(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The entry stored at each key (None where there is none); never more than VALUE_BYTES each."""

    def write(self, entries: Mapping[bytes, bytes]) -> None:
        """Store `entries` (key -> value), within the store's bounds."""


def fingerprint(facts: ModelFacts, files: str | None = None) -> bytes:
    """What decides a logit besides the pair's token ids: the model as it serves, and the libraries that compute it.

    `files` is a digest of a local model directory's files (`directory_digest`), for a model with no revision to name it.
    """
    import torch
    import transformers

    described = {
        "name": facts.name, "revision": facts.revision, "files": files, "dtype": facts.dtype, "attention": facts.attention,
        "device": facts.device.split(":")[0], "max_length": facts.max_length, "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return json.dumps(described, sort_keys=True).encode()


def directory_digest(path: str) -> str | None:
    """A digest of every file at the top of a local model directory (names and bytes); None for a hub id."""
    if not os.path.isdir(path):
        return None
    digest = hashlib.blake2b(digest_size=16)
    for file in sorted(p for p in Path(path).iterdir() if p.is_file()):
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as opened:
            hashlib.file_digest(opened, lambda: digest)  # streams the file into the one running digest
    return digest.hexdigest()


class ScoreCache:
    """Keys pairs, and reads and writes their authenticated logits in a `ScoreStore`; counts hits, misses and refusals."""

    def __init__(self, store: ScoreStore, secret: bytes, fingerprint: bytes) -> None:
        """Key entries under `secret` (the fleet's) for the model `fingerprint` describes."""
        if len(secret) < 32:
            raise ValueError("the score cache's secret must hold at least 32 bytes")
        self.store = store
        self._secret = secret
        self._keying = hmac.new(secret, b"rerank score key\0" + fingerprint, hashlib.sha256)
        self.counts = {"hits": 0, "misses": 0, "refused": 0}
        self._lock = threading.Lock()

    def keys(self, pairs: Sequence[EncodedPair]) -> list[bytes]:
        """Each pair's key: an HMAC of the fingerprint and its token ids (and type ids, where the model reads them)."""
        keys = []
        for pair in pairs:
            mac = self._keying.copy()
            mac.update(len(pair.input_ids).to_bytes(4, "little") + pair.input_ids.tobytes())
            if pair.type_ids is not None:
                mac.update(pair.type_ids.tobytes())
            keys.append(mac.digest()[:KEY_BYTES])
        return keys

    def read(self, keys: Sequence[bytes]) -> list[float | None]:
        """The cached logit of each key, None where there is none or its entry fails authentication."""
        unique = list(dict.fromkeys(keys))
        try:
            found = dict(zip(unique, self.store.read(unique)))
        except Exception:  # noqa: BLE001 - the cache only saves work: unreadable, every pair is scored
            log.warning("could not read the score cache; scoring every pair", exc_info=True)
            found = {}
        logits: list[float | None] = []
        refused = 0
        for key in keys:
            value = found.get(key)
            logit = self._open(key, value) if value is not None else None
            refused += value is not None and logit is None
            logits.append(logit)
        if refused:
            log.warning("refused %d score-cache entries that fail authentication: someone wrote them into Redis", refused)
        hits = sum(logit is not None for logit in logits)
        with self._lock:
            self.counts["hits"] += hits
            self.counts["misses"] += len(keys) - hits
            self.counts["refused"] += refused
        return logits

    def write(self, keys: Sequence[bytes], logits: Sequence[float]) -> None:
        """Store each key's logit, signed."""
        entries = {key: self._seal(key, logit) for key, logit in zip(keys, logits)}
        if not entries:
            return
        try:
            self.store.write(entries)
        except Exception:  # noqa: BLE001 - a full or unreachable Redis must not fail a request that was scored
            log.warning("could not write %d entries to the score cache", len(entries), exc_info=True)

    def _seal(self, key: bytes, logit: float) -> bytes:
        packed = struct.pack("<f", logit)
        return packed + self._tag(key, packed)

    def _open(self, key: bytes, value: bytes) -> float | None:
        if len(value) != VALUE_BYTES or not hmac.compare_digest(self._tag(key, value[:4]), value[4:]):
            return None
        return struct.unpack("<f", value[:4])[0]

    def _tag(self, key: bytes, packed: bytes) -> bytes:
        return hmac.digest(self._secret, b"rerank score value\0" + key + packed, "sha256")[:VALUE_BYTES - 4]


class CachedScorer:
    """A `Scorer` that serves pairs scored before from a `ScoreCache` and has its inner scorer score only the rest."""

    def __init__(self, inner: Scorer, cache: ScoreCache) -> None:
        """Score misses with `inner` (any worker shape), remembering them in `cache`."""
        self.inner = inner
        self.cache = cache
        self.facts = inner.facts
        self.tokenize = inner.tokenize

    def device_memory(self) -> dict[str, Any]:
        """What the inner scorer's process holds on its GPU."""
        return self.inner.device_memory()

    def score_pairs(self, pairs: Sequence[EncodedPair], on_batch: OnProgress | None = None) -> Scores:
        """Logits of pairs already tokenized: cached ones read back, the rest scored and remembered."""
        if not pairs:
            return EMPTY
        keys = self.cache.keys(pairs)
        known = self.cache.read(keys)
        misses = [i for i, logit in enumerate(known) if logit is None]
        fresh = self.inner.score_pairs([pairs[i] for i in misses], on_batch) if misses else EMPTY
        if misses:
            # One entry per distinct key: a request's repeats were scored once, alike.
            written = dict(zip((keys[i] for i in misses), fresh.logits))
            self.cache.write(list(written), list(written.values()))
        logits = list(known)
        for i, logit in zip(misses, fresh.logits):
            logits[i] = logit
        return replace(fresh, logits=logits, tokens=sum(len(p.input_ids) for p in pairs), cached=len(pairs) - len(misses))

    def score(
        self, query: str, passages: Sequence[str], on_batch: OnProgress | None = None, truncation: Truncation | None = None
    ) -> Scores:
        """Tokenize here, then `score_pairs`: what the cache holds is not scored again."""
        return tokenize_then_score(self, query, passages, on_batch, truncation)
