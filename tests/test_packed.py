"""Packed (unpadded) attention against today's padded forward and the unbatched reference, on CPU.

Logits are compared in fp32. Two fp32 computations of these random models in different orders
(batched or not, masked or not) differ by up to ~3e-5 in a logit of magnitude ~4 (HF's own padded
batch against its unbatched forward does too), so scores (probabilities) are held to 1e-5 and
logits to 5e-5, as in test_engine.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

from contract.errors import ModelLoadError
from scoring.engine import CrossEncoderEngine
from scoring.packed import PackedForward
from tests.helpers import CORPUS, QUERY, reference_logits, sigmoid

SCORE_TOLERANCE = 1e-5
LOGIT_TOLERANCE = 5e-5


@pytest.fixture(scope="module")
def bert_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight BertForSequenceClassification (1 label, token type ids) with a WordPiece tokenizer trained on CORPUS."""
    path = tmp_path_factory.mktemp("tiny-bert")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trained = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    trained.normalizer = normalizers.BertNormalizer(lowercase=True)
    trained.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trained.decoder = decoders.WordPiece()
    trained.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=600, special_tokens=specials))
    cls, sep = trained.token_to_id("[CLS]"), trained.token_to_id("[SEP]")
    trained.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer = BertTokenizerFast(
        tokenizer_object=trained, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=trained.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=512, type_vocab_size=2, num_labels=1, pad_token_id=trained.token_to_id("[PAD]"),
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        # Spread the logits (std 3) so that the test can tell passages apart, as worker.synthetic does.
        encoded = tokenizer([[QUERY, text] for text in CORPUS[:32]], padding=True, return_tensors="pt")
        logits = model(**encoded).logits[:, 0]
        scale = 3.0 / logits.std().item()
        model.classifier.weight.mul_(scale)
        model.classifier.bias.copy_((model.classifier.bias - logits.mean()) * scale)
    model.save_pretrained(path)
    return path


def passages() -> list[str]:
    """Passages of very different lengths, one far past max_length, and two repeated."""
    mixed = [" ".join(CORPUS[i : i + 1 + (i * 7) % 23]) for i in range(30)]
    return mixed + [" ".join(CORPUS) * 3] + mixed[:2]


@pytest.fixture(scope="module", params=["xlm-roberta", "bert"])
def model_dir(request, tiny_model: Path, bert_model: Path) -> Path:
    return {"xlm-roberta": tiny_model, "bert": bert_model}[request.param]


@pytest.fixture(scope="module")
def engines(model_dir: Path) -> tuple[CrossEncoderEngine, CrossEncoderEngine]:
    return CrossEncoderEngine.load(str(model_dir), attention="padded"), CrossEncoderEngine.load(str(model_dir), attention="packed")


def test_packed_scores_equal_padded_and_reference_scores(engines, model_dir):
    # Given the same model behind padded and packed attention, and passages of mixed lengths
    padded, packed = engines
    texts = passages()
    # When both score them
    expected = padded.score(QUERY, texts)
    scores = packed.score(QUERY, texts)
    # Then packed attention gave the padded scores, and both the unbatched reference's
    reference = reference_logits(model_dir, QUERY, texts)
    assert scores.probabilities == pytest.approx(expected.probabilities, abs=SCORE_TOLERANCE)
    assert scores.logits == pytest.approx(expected.logits, abs=LOGIT_TOLERANCE)
    assert scores.probabilities == pytest.approx(sigmoid(reference), abs=SCORE_TOLERANCE)
    assert len({round(x, 2) for x in reference}) > 10, "the model must tell passages apart"
    # And no token was padding
    assert scores.padded_tokens == sum(len(p.input_ids) for p in {tuple(p.input_ids): p for p in packed.tokenize(QUERY, texts)}.values())
    assert expected.padded_tokens >= scores.padded_tokens


def test_pairs_are_the_tokenizers_own_pair_encoding_with_type_ids(engines):
    _, packed = engines
    pair = packed.tokenize(QUERY, ["Apixaban reduced bleeding."])[0]
    encoded = packed.tokenize.tokenizer(QUERY, "Apixaban reduced bleeding.")
    assert list(pair.input_ids) == encoded["input_ids"]
    if packed.runner.model.config.model_type == "bert":
        # BERT: the passage and its [SEP] are type 1, and the packed encoder reads them
        assert list(pair.type_ids) == encoded["token_type_ids"] and set(pair.type_ids) == {0, 1}
        assert packed.runner.layout.uses_type_ids
        types = packed.runner.layout.encoder.token_type
        assert not torch.equal(types[0], types[1]), "type embeddings must differ for this to test anything"


def test_a_pair_exactly_at_max_length_and_a_batch_of_one(engines, model_dir):
    # Given a passage that fills the pair to max_length, scored alone
    padded, packed = engines
    long = [" ".join(CORPUS) * 3]
    assert len(packed.tokenize(QUERY, long)[0].input_ids) == packed.facts.max_length
    # When packed attention scores it, as a batch of one pair
    scores = packed.score(QUERY, long)
    # Then it is the padded and the reference score
    assert scores.batches == 1 and scores.padded_tokens == packed.facts.max_length
    assert scores.logits == pytest.approx(padded.score(QUERY, long).logits, abs=LOGIT_TOLERANCE)
    assert scores.probabilities == pytest.approx(sigmoid(reference_logits(model_dir, QUERY, long)), abs=SCORE_TOLERANCE)


def test_identical_pairs_are_scored_once_with_identical_scores(engines):
    _, packed = engines
    texts = [" ".join(CORPUS[i : i + 4]) for i in range(8)]
    once = packed.score(QUERY, texts)
    twice = packed.score(QUERY, texts + texts[:5] + texts[:1])
    assert twice.logits[8:13] == twice.logits[:5] and twice.logits[13] == twice.logits[0]
    assert twice.padded_tokens == once.padded_tokens
    assert twice.logits[:8] == pytest.approx(once.logits, abs=LOGIT_TOLERANCE)


def test_out_of_memory_splits_a_packed_batch_and_still_scores_everything(model_dir, monkeypatch):
    # Given a packed engine whose forward pass runs out of memory on any batch over 4 pairs
    engine = CrossEncoderEngine.load(str(model_dir), attention="packed", max_batch_tokens=65536)
    real_forward = engine.runner.forward_batch
    calls: list[int] = []

    def forward_with_small_memory(pairs):
        calls.append(len(pairs))
        if len(pairs) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(pairs)

    monkeypatch.setattr(engine.runner, "forward_batch", forward_with_small_memory)
    texts = passages()[:20]
    # When it scores 20 passages in what was planned as one batch
    scores = engine.score(QUERY, texts)
    # Then it backed off to batches of at most 4, counted each, and every score is right
    ran = [n for n in calls if n <= 4]
    assert calls[0] == 20 and sum(ran) == 20 and scores.batches == len(ran)
    assert scores.probabilities == pytest.approx(sigmoid(reference_logits(model_dir, QUERY, texts)), abs=SCORE_TOLERANCE)


def test_tokenizing_ahead_in_slices_keeps_scores_dedup_and_progress(engines, model_dir):
    # Given a packed engine that tokenizes 7 passages at a time while earlier slices run
    _, packed = engines
    sliced = CrossEncoderEngine.of(
        packed.runner.model, packed.tokenize.tokenizer, name=packed.facts.name, attention="packed", tokenize_slice=7, max_batch_tokens=1024
    )
    texts = passages()
    progress: list[tuple[int, int]] = []
    # When it scores them, with a repeat that lands in a later slice than its original
    scores = sliced.score(QUERY, texts, on_batch=lambda done, total: progress.append((done, total)))
    # Then the scores are the unsliced ones, the repeat was not recomputed, and progress ran to done == total
    whole = packed.score(QUERY, texts)
    assert scores.logits == pytest.approx(whole.logits, abs=LOGIT_TOLERANCE)
    assert scores.logits[-2:] == scores.logits[:2]
    assert scores.padded_tokens == whole.padded_tokens
    # (progress counts unique pairs scored: one report per batch, rising to all of them)
    dones = [done for done, _ in progress]
    assert len(progress) == scores.batches and dones == sorted(set(dones))
    assert all(total >= done for done, total in progress) and progress[-1] == (len(set(texts)), len(set(texts)))


def test_a_failing_batch_while_later_slices_are_tokenized_raises_at_once(engines, monkeypatch):
    _, packed = engines
    sliced = CrossEncoderEngine.of(packed.runner.model, packed.tokenize.tokenizer, name=packed.facts.name, attention="packed", tokenize_slice=4)

    def broken(pairs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(sliced.runner, "forward_batch", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        sliced.score(QUERY, passages())


def test_rerank_attention_packed_is_honoured_on_cpu(tiny_model, monkeypatch):
    # Given RERANK_ATTENTION=packed in a CPU worker's environment
    from producer import Settings
    from worker import runtime

    monkeypatch.setenv("RERANK_ATTENTION", "packed")
    monkeypatch.setattr(runtime, "_engine", None)
    monkeypatch.setattr(runtime, "_loads", 0)
    # When the worker loads its engine
    engine = runtime.load_engine(Settings(broker_url=None, model=str(tiny_model), torch_threads=1))
    # Then it runs packed attention, with the reference attention since a CPU has no FlashAttention
    assert engine.facts.attention == "packed"
    assert isinstance(engine.runner.layout, PackedForward) and engine.runner.layout.kernel == "sdpa_per_pair"


def test_unset_attention_is_packed_on_cpu(tiny_model):
    engine = CrossEncoderEngine.load(str(tiny_model))
    assert engine.facts.attention == "packed"


def test_packed_refuses_an_architecture_it_cannot_run_and_names_the_fix(tiny_model):
    # Given an XLM-R model with a ReLU feed-forward, which the packed encoder does not implement
    config = XLMRobertaConfig(
        vocab_size=600, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=1, hidden_act="relu"
    )
    model = XLMRobertaForSequenceClassification(config)
    tokenizer = CrossEncoderEngine.load(str(tiny_model)).tokenize.tokenizer
    # Then packed attention is refused with what to set instead, and padded attention still loads
    with pytest.raises(ModelLoadError, match=r"hidden_act 'relu'.*RERANK_ATTENTION=padded"):
        CrossEncoderEngine.of(model, tokenizer, name="relu-model", attention="packed")
    assert CrossEncoderEngine.of(model, tokenizer, name="relu-model").facts.attention == "padded"


def test_packed_warm_up_is_one_full_budget_of_longest_pairs(tiny_model, monkeypatch):
    engine = CrossEncoderEngine.load(str(tiny_model), attention="packed", max_batch_tokens=2048)
    shapes = []
    real_forward = engine.runner.forward_batch
    monkeypatch.setattr(engine.runner, "forward_batch", lambda pairs: shapes.append((len(pairs), len(pairs[0].input_ids))) or real_forward(pairs))
    engine.runner.warm_shapes()
    assert shapes == [(4, 512)]


def test_a_batch_padded_up_to_its_graph_size_class_keeps_its_logits(engines):
    # Given packed batches of mixed sizes and the size classes CUDA graphs are captured for
    from scoring.packed import pack, pack_host, size_class

    _, packed = engines
    layout = packed.runner.layout
    encoder = layout.encoder
    pairs = packed.tokenize(QUERY, passages()[:13])
    for count in (1, 5, 13):
        batch = pairs[:count]
        tokens = sum(len(p.input_ids) for p in batch)
        size = size_class(tokens, count, step=256)
        # When a batch is padded with filler pairs up to its class and run through the encoder
        host, padded_layout = pack_host(batch, encoder.position_offset, layout.uses_type_ids, size=size, filler_id=1, max_position=514)
        padded = encoder(padded_layout.on(host))
        alone = encoder(pack(batch, torch.device("cpu"), encoder.position_offset, layout.uses_type_ids))
        # Then the class holds the batch with room for its fillers, and the real pairs' logits are unchanged
        assert size[0] % 256 == 0 and size[0] >= tokens + size[1] - count and size[1] > count
        assert padded_layout.tokens == size[0] and padded_layout.pairs == size[1] and min(padded_layout.bounds[1:][i] - padded_layout.bounds[i] for i in range(size[1])) >= 1
        # (1e-5 relative or absolute: more rows change how a matrix product is split into blocks, a logit of 1.65 moved 1.1e-5)
        assert padded[:count].tolist() == pytest.approx(alone.tolist(), rel=1e-5, abs=1e-5)
