"""Finding, checking and loading a cross-encoder's files: config, tokenizer, weights (no scoring)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from contract.errors import ModelLoadError
from scoring.facts import Architecture, Weights

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# RoBERTa-style position ids start after the padding index, so 514 positions hold 512 tokens.
_POSITION_OFFSET = {"xlm-roberta": 2, "roberta": 2, "camembert": 2}


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """Map a dtype setting to a torch dtype; `auto` is fp16 on CUDA and fp32 on CPU."""
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return DTYPES[dtype]


def usable_length(config: AutoConfig, tokenizer: PreTrainedTokenizerBase) -> int:
    """The most tokens one pair may have for this model (e.g. 512 for 514 positions)."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return tokenizer.model_max_length
    return positions - _POSITION_OFFSET.get(config.model_type, 0)


HUB_PROBE_SECONDS = 3.0
"""How long one request may take to tell whether the model hub answers, before models load from the cache alone."""


@functools.cache
def hub_unreachable() -> bool:
    """Whether this process works offline: HF_HUB_OFFLINE is set, or one request to the hub, without retries, failed.

    Asked once per process (forked pool processes inherit the answer). Offline, a hub id loads from the
    local cache alone: Hugging Face's own client retries for about 23 seconds first.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return True
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_SECONDS)
    except Exception as e:  # noqa: BLE001 - whatever the transport raises, the hub did not answer
        log.info("the model hub cannot be reached (%s): hub ids load from the local cache only", type(e).__name__)
        return True
    return False


def _offline_hub_id(name_or_path: str) -> bool:
    """Whether `name_or_path` names a model on the hub (`org/name`, not a path) while the hub cannot be reached."""
    hub_id = re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", name_or_path) is not None and not os.path.isdir(name_or_path)
    return hub_id and hub_unreachable()


def _sources(name_or_path: str) -> dict[str, bool]:
    """from_pretrained's options for `name_or_path`: the cache alone for a hub id while the hub cannot be reached."""
    return {"local_files_only": True} if _offline_hub_id(name_or_path) else {}


def _not_here(name_or_path: str) -> ModelLoadError | None:
    """The one-line refusal of a hub id that is not cached while the hub cannot be reached, else None."""
    if not _offline_hub_id(name_or_path):
        return None
    return ModelLoadError(
        f"RERANK_MODEL={name_or_path} is not in this host's model cache and cannot be downloaded here (the model hub does not "
        "answer); set RERANK_MODEL to a local model directory (config.json, weights, tokenizer files), or to try things "
        "out make a random-weight stand-in: python -m worker.synthetic stand-in --text tests/data/medical_corpus.txt, "
        "then RERANK_MODEL=./stand-in"
    )


def load_tokenizer(name_or_path: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer alone (what a host process needs to tokenize for a device process)."""
    try:
        return AutoTokenizer.from_pretrained(name_or_path, revision=revision, **_sources(name_or_path))
    except (OSError, ValueError) as e:
        raise _not_here(name_or_path) or ModelLoadError(f"cannot load the tokenizer of {name_or_path!r}: {e}") from e


def import_architecture(config: AutoConfig) -> None:
    """Import the module of the model class `config` names, as loading it would (transformers imports it on first use).

    A worker's parent does this before its pool forks, so each pool process that loads the model
    finds it imported instead of importing it again (about 1.5 s of CPU each, mostly torch.distributed).
    """
    with contextlib.suppress(KeyError, ImportError):  # an unknown architecture fails, with its message, at load
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]


def load_model(name_or_path: str, revision: str | None, device: str, dtype: str) -> torch.nn.Module:
    """The model's weights in `dtype` on `device`, in eval mode."""
    torch_dtype = resolve_dtype(dtype, device)
    if torch_dtype == torch.bfloat16 and device == "cpu" and not cpu_has_native_bf16():
        log.warning("bf16 requested on a CPU without AVX512-BF16 or AMX: expect it to be several times slower than fp32")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, revision=revision, dtype=torch_dtype, attn_implementation="sdpa", **_sources(name_or_path)
        )
        model.to(device)
    except (OSError, ValueError, RuntimeError) as e:
        raise _not_here(name_or_path) or ModelLoadError(f"cannot load model weights of {name_or_path!r} onto {device}: {e}") from e
    return model.eval()


def weights_of(model: torch.nn.Module, name: str) -> Weights:
    """Where a loaded model's weights came from (`name` when its config does not say), their size, and its architecture."""
    config = model.config
    parameters = list(model.parameters())
    return Weights(
        path=str(getattr(config, "_name_or_path", "") or name),
        bytes=sum(p.numel() * p.element_size() for p in parameters),
        architecture=Architecture(
            model_type=config.model_type,
            architectures=tuple(getattr(config, "architectures", None) or [type(model).__name__]),
            parameters=sum(p.numel() for p in parameters),
            trainable_parameters=sum(p.numel() for p in parameters if p.requires_grad),
            layers=getattr(config, "num_hidden_layers", None),
            hidden_size=getattr(config, "hidden_size", None),
            attention_heads=getattr(config, "num_attention_heads", None),
            intermediate_size=getattr(config, "intermediate_size", None),
            vocab_size=getattr(config, "vocab_size", None),
            max_position_embeddings=getattr(config, "max_position_embeddings", None),
            modules=tuple(f"{child}: {type(module).__name__}" for child, module in model.named_children()),
        ),
    )


@functools.cache
def hub_commit(name_or_path: str, pinned: str | None = None) -> str | None:
    """The commit of the hub snapshot the model's files come from, else the pinned revision (None for a plain local directory)."""
    from huggingface_hub import try_to_load_from_cache
    from transformers.utils.hub import extract_commit_hash

    if os.path.isdir(name_or_path):
        config = os.path.join(os.path.abspath(name_or_path), "config.json")
    else:
        config = try_to_load_from_cache(name_or_path, "config.json", revision=pinned)
    # A file in the hub cache sits in snapshots/<commit>/; anything else has no commit to tell.
    return (extract_commit_hash(config, None) if isinstance(config, str) else None) or pinned


def check_model(name_or_path: str, revision: str | None = None, max_length: int | None = None) -> tuple[AutoConfig, PreTrainedTokenizerBase]:
    """Load the config and tokenizer and check, without loading weights or touching CUDA, that the model can serve.

    It must be a one-logit cross-encoder whose tokenizer belongs to it, whose local weights are
    whole, and which reads `max_length` tokens. Workers run this before their pool starts.
    """
    try:
        config = AutoConfig.from_pretrained(name_or_path, revision=revision, **_sources(name_or_path))
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, **_sources(name_or_path))
    except (OSError, ValueError) as e:
        raise _not_here(name_or_path) or ModelLoadError(
            f"cannot load {name_or_path!r}: {e}. Set RERANK_MODEL to a hub id this host can download, "
            "or to a local directory holding config.json, the weights and the tokenizer files"
        ) from e
    if getattr(config, "num_labels", None) != 1:
        raise ModelLoadError(
            f"{name_or_path!r} has {config.num_labels} output labels; a re-ranker needs exactly one "
            "relevance logit (a cross-encoder such as BAAI/bge-reranker-v2-m3)"
        )
    # Without its tokenizer files transformers builds a stand-in with a handful of tokens, which
    # turns every word into <unk>; a tokenizer with more tokens than the embedding has rows
    # produces ids the model cannot look up. Vocabularies are sometimes padded, never halved.
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and not vocab // 2 <= len(tokenizer) <= vocab:
        raise ModelLoadError(
            f"the tokenizer of {name_or_path!r} has {len(tokenizer)} tokens but the model's embedding has {vocab}: "
            "its tokenizer files are missing or belong to another model; put this model's tokenizer.json "
            "(and sentencepiece.bpe.model or vocab.txt) next to its config.json"
        )
    limit = usable_length(config, tokenizer)
    if max_length is not None and max_length > limit:
        raise ModelLoadError(
            f"RERANK_MAX_LENGTH={max_length} exceeds what {name_or_path} can read ({limit} tokens); "
            f"set RERANK_MAX_LENGTH to {limit} or less"
        )
    check_weights(name_or_path)
    return config, tokenizer


def check_weights(name_or_path: str) -> None:
    """In a local model directory, check that weights exist and that safetensors files are whole (headers only, no tensors read).

    A hub id is left to `from_pretrained`, which downloads and checks what it fetches.
    """
    directory = Path(name_or_path)
    if not directory.is_dir():
        return
    safetensors = sorted(directory.glob("*.safetensors"))
    if not safetensors and not any(directory.glob("pytorch_model*.bin")):
        raise ModelLoadError(
            f"no weights in {name_or_path!r}: expected model.safetensors (or its shards, or pytorch_model.bin) next to config.json"
        )
    for path in safetensors:
        try:
            with safe_open(str(path), "pt") as weights:
                weights.keys()
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"the weights file {path} cannot be read ({e}); download it again") from e


def cpu_has_native_bf16() -> bool:
    """True when the CPU reports AVX512-BF16 or AMX-BF16 (Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))
