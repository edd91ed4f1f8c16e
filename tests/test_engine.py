"""The scoring engine on a tiny real model, against a direct forward pass."""

from __future__ import annotations

import time

import pytest
import torch

from contract.errors import ModelLoadError
from scoring.engine import CrossEncoderEngine
from tests.helpers import CORPUS, QUERY, reference_logits, sigmoid


@pytest.fixture(scope="module")
def engine(tiny_model) -> CrossEncoderEngine:
    return CrossEncoderEngine.load(str(tiny_model))


def passages_of_mixed_length() -> list[str]:
    return [" ".join(CORPUS[i : i + 1 + (i * 7) % 23]) for i in range(40)]


def test_scores_equal_a_direct_forward_pass(engine, tiny_model):
    # Given passages of very different lengths, so sorting and padding matter
    passages = passages_of_mixed_length()
    # When the engine scores them
    scores = engine.score(QUERY, passages)
    # Then every score matches the model's own pair encoding and forward pass, in input order
    expected = reference_logits(tiny_model, QUERY, passages)
    assert scores.probabilities == pytest.approx(sigmoid(expected), abs=1e-5)
    assert scores.logits == pytest.approx(expected, abs=5e-5)
    assert len(set(round(x, 3) for x in expected)) > 10, "the tiny model must tell passages apart"


def test_token_budget_splits_batches_without_changing_scores(tiny_model):
    # Given an engine whose token budget holds only a few pairs per forward pass
    small = CrossEncoderEngine.load(str(tiny_model), max_batch_tokens=512)
    passages = passages_of_mixed_length()
    # When it scores
    scores = small.score(QUERY, passages)
    # Then it ran many batches, none over budget, with the same scores
    assert scores.batches > 5
    assert scores.padded_tokens <= scores.batches * 512
    assert scores.probabilities == pytest.approx(sigmoid(reference_logits(tiny_model, QUERY, passages)), abs=1e-5)


def test_rounded_batch_widths_keep_scores_and_stay_within_budget(tiny_model):
    # Given an engine that rounds batch widths up to a multiple of 32, as CUDA workers do with 64
    rounded = CrossEncoderEngine.load(str(tiny_model), max_batch_tokens=512, pad_multiple=32, attention="padded")
    passages = passages_of_mixed_length()
    # When it scores
    scores = rounded.score(QUERY, passages)
    # Then every batch's width was a multiple of 32 (padded tokens add up to such widths), no batch
    # went over budget, and the extra padding changed no score: it is masked out
    assert scores.padded_tokens % 32 == 0
    assert scores.padded_tokens <= scores.batches * 512
    assert scores.probabilities == pytest.approx(sigmoid(reference_logits(tiny_model, QUERY, passages)), abs=1e-5)
    width = rounded.runner.layout.width
    assert width(1) == 32 and width(33) == 64 and width(rounded.facts.max_length) == rounded.facts.max_length


def test_cuda_warm_up_runs_one_full_batch_at_every_rounded_width(tiny_model, monkeypatch):
    # Given an engine that rounds widths to 128 with a 1024-token budget (CUDA warms up this way)
    rounded = CrossEncoderEngine.load(str(tiny_model), max_batch_tokens=1024, pad_multiple=128, attention="padded")
    shapes = []
    real_forward = rounded.runner.forward_batch
    monkeypatch.setattr(rounded.runner, "forward_batch", lambda pairs: shapes.append((len(pairs), len(pairs[0].input_ids))) or real_forward(pairs))
    # When it warms its widths
    rounded.runner.warm_shapes()
    # Then it ran each width a request can have, once, as many rows as the budget allows
    assert shapes == [(8, 128), (4, 256), (2, 384), (2, 512)]


def test_sorting_by_length_pads_less_than_input_order(engine):
    passages = passages_of_mixed_length()
    scores = engine.score(QUERY, passages)
    longest = max(len(p.input_ids) for p in engine.tokenize(QUERY, passages))
    assert scores.padded_tokens < longest * len(passages)


def test_a_long_passage_is_cut_and_the_query_survives(engine, tiny_model):
    # Given a passage far longer than max_length
    passage = " ".join(CORPUS) * 3
    # When it is tokenized with the query
    pair = engine.tokenize(QUERY, [passage])[0]
    query_ids = engine.tokenize.tokenizer(QUERY, add_special_tokens=False)["input_ids"]
    # Then the pair fills max_length exactly, and the whole query sits right after <s>
    assert len(pair.input_ids) == 512
    assert list(pair.input_ids[1 : 1 + len(query_ids)]) == query_ids
    expected = sigmoid(reference_logits(tiny_model, QUERY, [passage]))
    assert engine.score(QUERY, [passage]).probabilities == pytest.approx(expected, abs=1e-5)


def test_a_long_query_is_capped_at_three_quarters_of_max_length(engine):
    long_query = " ".join(CORPUS[:20])
    pair = engine.tokenize(long_query, ["Apixaban reduced bleeding in kidney disease."])[0]
    passage_ids = engine.tokenize.tokenizer("Apixaban reduced bleeding in kidney disease.", add_special_tokens=False)["input_ids"]
    # <s> query(384) </s></s> passage </s>
    assert list(pair.input_ids[1 + 384 : 1 + 384 + 2]) == [engine.tokenize.tokenizer.sep_token_id] * 2
    assert list(pair.input_ids[1 + 384 + 2 : -1]) == passage_ids


def test_empty_input_returns_empty_scores(engine):
    assert engine.score(QUERY, []).logits == []


def test_out_of_memory_splits_the_batch_and_still_scores_everything(tiny_model, monkeypatch):
    # Given an engine whose forward pass runs out of memory on any batch over 4 pairs
    engine = CrossEncoderEngine.load(str(tiny_model), max_batch_tokens=65536)
    real_forward = engine.runner.forward_batch
    calls: list[int] = []

    def forward_with_small_memory(pairs):
        calls.append(len(pairs))
        if len(pairs) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(pairs)

    monkeypatch.setattr(engine.runner, "forward_batch", forward_with_small_memory)
    passages = passages_of_mixed_length()[:20]
    # When it scores 20 passages
    scores = engine.score(QUERY, passages)
    # Then it backed off to batches of at most 4 and every score is right
    assert max(calls) == 20 and [n for n in calls if n <= 4]
    assert scores.probabilities == pytest.approx(sigmoid(reference_logits(tiny_model, QUERY, passages)), abs=1e-5)


def test_other_runtime_errors_are_not_swallowed(tiny_model, monkeypatch):
    engine = CrossEncoderEngine.load(str(tiny_model))

    def broken(pairs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(engine.runner, "forward_batch", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        engine.score(QUERY, ["a passage", "another passage"])


def test_bad_model_path_raises_model_load_error_naming_the_fix(tmp_path):
    with pytest.raises(ModelLoadError, match="RERANK_MODEL"):
        CrossEncoderEngine.load(str(tmp_path / "no-such-model"))


def test_max_length_beyond_the_model_is_refused(tiny_model):
    with pytest.raises(ModelLoadError, match=r"RERANK_MAX_LENGTH=1024 exceeds .*\(512 tokens\)"):
        CrossEncoderEngine.load(str(tiny_model), max_length=1024)


def test_dtype_auto_is_fp32_on_cpu_and_bf16_is_honoured(tiny_model):
    assert CrossEncoderEngine.load(str(tiny_model)).runner.dtype == torch.float32
    bf16 = CrossEncoderEngine.load(str(tiny_model), dtype="bf16")
    assert bf16.runner.dtype == torch.bfloat16 and bf16.facts.dtype == "bfloat16"
    logits = bf16.score(QUERY, CORPUS[:10]).logits
    assert all(isinstance(x, float) for x in logits)
    assert logits == pytest.approx(CrossEncoderEngine.load(str(tiny_model)).score(QUERY, CORPUS[:10]).logits, abs=0.5)


def test_identical_pairs_get_identical_scores_and_are_computed_once(engine):
    passages = passages_of_mixed_length()[:10]
    scores = engine.score(QUERY, passages + passages[:5])
    assert scores.logits[10:] == scores.logits[:5]
    assert scores.padded_tokens == engine.score(QUERY, passages).padded_tokens


# Long texts: only what max_length can use is tokenized, and the tokens are those of the whole text


def full_ids(engine: CrossEncoderEngine, text: str) -> list[int]:
    return engine.tokenize.backend.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize(
    "text",
    [
        " ".join(CORPUS) * 40,  # ~100,000 characters of prose
        " " * 50_000 + " ".join(CORPUS[:30]),  # whitespace that normalizes away, then words
        "\n\n".join(CORPUS) * 20,
        "x" * 300 + " " + " ".join(CORPUS) * 10,  # a long token first
    ],
    ids=["prose", "leading-whitespace", "paragraphs", "long-first-word"],
)
def test_a_long_passage_is_cut_before_tokenizing_and_keeps_the_whole_texts_tokens(engine, text):
    pair = engine.tokenize(QUERY, [text])[0]
    query = full_ids(engine, QUERY)
    budget = engine.facts.max_length - len(query) - engine.tokenize.template.specials
    assert list(pair.input_ids[len(engine.tokenize.template.prefix) + len(query) + len(engine.tokenize.template.middle) :][:budget]) == full_ids(engine, text)[:budget]
    assert len(pair.input_ids) == min(engine.facts.max_length, len(query) + engine.tokenize.template.specials + len(full_ids(engine, text)))


def test_tokenizing_time_does_not_grow_with_text_length(engine):
    # Given 200 passages of 100,000 characters, and the same passages cut to 5,000
    long = [f"{i} " + " ".join(CORPUS) * 40 for i in range(200)]
    short = [text[:5000] for text in long]
    timings = {}
    for name, texts in (("short", short), ("long", long)):
        started = time.perf_counter()
        engine.tokenize(QUERY, texts)
        timings[name] = time.perf_counter() - started
    # Then the long ones take about as long as the short ones (whole, they would take 20x)
    assert timings["long"] < 3 * timings["short"] + 0.05, timings
