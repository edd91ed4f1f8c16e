"""Truncation asked per request (`max_passage_tokens`, `truncate`; Cohere's `max_tokens_per_doc`, TEI's `truncate` and
`truncation_direction`): a passage cut to N tokens scores as the same passage cut to N tokens by hand, in every
scorer shape, through the Python client, and through the gateway with the cohere SDK and a TEI-shaped request."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from contract.errors import InvalidRequest
from contract.formats import stage1_message
from contract.schemas import DocumentsRequest
from contract.settings import Settings
from contract.validation import parse_request
from scoring.engine import CrossEncoderEngine
from scoring.tokens import Truncation
from tests.gateway_helpers import KEY, Gateway
from tests.helpers import CORPUS, QUERY

LONG = " ".join(CORPUS[:80])  # about 2,100 tokens: far over any pair's room
N = 40


@pytest.fixture(scope="module")
def engine(tiny_engine) -> CrossEncoderEngine:
    return tiny_engine


def cut_by_hand(engine: CrossEncoderEngine, text: str, n: int, end: bool = True) -> str:
    """`text` cut to its first (or last) `n` tokens at their character offsets, checked to tokenize to exactly those."""
    encode = engine.tokenize.backend.encode
    whole = encode(text, add_special_tokens=False)
    cut = text[: whole.offsets[n - 1][1]] if end else text[whole.offsets[-n][0] :]
    assert encode(cut, add_special_tokens=False).ids == (whole.ids[:n] if end else whole.ids[-n:])
    return cut


def room(engine: CrossEncoderEngine, query: str) -> int:
    """Passage tokens a pair with `query` has room for."""
    tokenize = engine.tokenize
    return tokenize.max_length - len(tokenize.backend.encode(query, add_special_tokens=False).ids) - tokenize.template.specials


def query_for_a_clean_tail(engine: CrossEncoderEngine, text: str) -> str:
    """A query whose pair leaves room for a tail of `text` that a string can hold: one that starts at a word ("▁...")."""
    backend = engine.tokenize.backend
    whole = backend.encode(text, add_special_tokens=False).ids
    for extra in range(8):
        query = QUERY + " kidney" * extra
        if backend.id_to_token(whole[-room(engine, query)]).startswith("▁"):
            return query
    raise AssertionError("no query leaves a clean tail")


@pytest.fixture(scope="module")
def shapes(scorer_shapes) -> dict:
    return scorer_shapes


@pytest.mark.parametrize("shape", ["engine", "threads", "device"])
@pytest.mark.parametrize("truncate", ["end", "start"])
def test_a_passage_over_max_passage_tokens_scores_as_itself_cut_to_that_many_tokens_in_every_shape(shapes, engine, shape, truncate):
    # Given a passage of about 2,100 tokens and the same passage cut by hand to its first (or last) 40
    cut = cut_by_hand(engine, LONG, N, end=truncate == "end")
    # When each scorer shape scores the long one with max_passage_tokens=40
    scored = shapes[shape].score(QUERY, [LONG, CORPUS[3]], truncation=Truncation(N, truncate))
    # Then its logit is the hand-cut passage's, and the short passage is untouched
    assert scored.logits == pytest.approx(engine.score(QUERY, [cut, CORPUS[3]]).logits, abs=1e-5)
    # And the pair held exactly the query, the template and 40 passage tokens
    query = len(engine.tokenize.backend.encode(QUERY, add_special_tokens=False).ids)
    assert scored.tokens - len(engine.tokenize(QUERY, [CORPUS[3]])[0].input_ids) == query + engine.tokenize.template.specials + N


def test_the_passage_start_is_cut_to_fit_the_pair_when_no_limit_is_asked(engine):
    # Given a passage far over the pair's room, cut at its start
    pair = engine.tokenize(QUERY, [LONG], Truncation(truncate="start"))[0]
    whole = engine.tokenize.backend.encode(LONG, add_special_tokens=False).ids
    # Then the pair is RERANK_MAX_LENGTH long and ends with the passage's last tokens, then the template's suffix
    suffix = engine.tokenize.template.suffix
    assert len(pair.input_ids) == engine.tokenize.max_length
    room = engine.tokenize.max_length - len(engine.tokenize.backend.encode(QUERY, add_special_tokens=False).ids) - engine.tokenize.template.specials
    assert list(pair.input_ids)[-len(suffix) - room : -len(suffix)] == whole[-room:]


def test_truncate_never_refuses_a_passage_or_query_that_would_be_cut_and_names_it(engine):
    tokenize = engine.tokenize
    # Given passages that fit, nothing is refused
    assert len(tokenize(QUERY, [CORPUS[0], CORPUS[1]], Truncation(truncate="never"))) == 2
    # When the second passage is over max_passage_tokens, or over the pair's room
    with pytest.raises(InvalidRequest, match=r"^passages\.1 has more tokens than max_passage_tokens=40.*truncate=never"):
        tokenize(QUERY, [CORPUS[0], LONG], Truncation(N, "never"))
    with pytest.raises(InvalidRequest, match=r"^passages\.0 has more tokens than the \d+ its pair has room for \(RERANK_MAX_LENGTH=512"):
        tokenize(QUERY, [LONG], Truncation(truncate="never"))
    # And a query over 3/4 of the pair is refused rather than cut
    with pytest.raises(InvalidRequest, match=r"the query has \d+ tokens, over the 384 a query may take"):
        tokenize(LONG[:3000], [CORPUS[0]], Truncation(truncate="never"))


def test_the_contract_limits_the_fields_and_leaves_them_out_of_messages_when_unset():
    settings = Settings(broker_url=None)
    paper = {"id": "p", "title": "t", "text": "x"}
    # Given a request with no truncation asked: its message carries no truncation fields (an older worker reads it)
    plain = parse_request(DocumentsRequest, {"query": "q", "candidates": [paper]}, settings)
    assert not {"max_passage_tokens", "truncate"} & set(stage1_message(plain))
    # When truncation is asked, it travels
    asked = parse_request(DocumentsRequest, {"query": "q", "candidates": [paper], "max_passage_tokens": 9, "truncate": "start"}, settings)
    assert stage1_message(asked)["max_passage_tokens"] == 9 and stage1_message(asked)["truncate"] == "start"
    # And nonsense is refused before anything is queued
    with pytest.raises(InvalidRequest, match="max_passage_tokens=2000000 is over 1,000,000"):
        parse_request(DocumentsRequest, {"query": "q", "candidates": [paper], "max_passage_tokens": 2_000_000}, settings)
    for bad in ({"max_passage_tokens": 0}, {"max_passage_tokens": "40"}, {"truncate": "middle"}):
        with pytest.raises(InvalidRequest):
            parse_request(DocumentsRequest, {"query": "q", "candidates": [paper], **bad}, settings)


# Through a real worker ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(shared_worker, redis_server, tiny_model):
    from producer import RerankClient

    return RerankClient(Settings(broker_url=redis_server.url, model=str(tiny_model)))


@pytest.mark.integration
def test_the_python_clients_truncation_reaches_the_worker(client, engine, redis_settings):
    from producer.aio import AsyncRerankClient

    cut = cut_by_hand(engine, LONG, N)
    # When the sync and async clients score a long passage with max_passage_tokens=40
    asked = client.rerank_passages(QUERY, [LONG, CORPUS[5]], max_passage_tokens=N, return_logits=True, timeout=60)
    awaited = asyncio.run(AsyncRerankClient(redis_settings).rerank_passages(QUERY, [LONG, CORPUS[5]], max_passage_tokens=N, timeout=60))
    by_hand = client.rerank_passages(QUERY, [cut, CORPUS[5]], return_logits=True, timeout=60)
    # Then the worker scored it as the passage cut by hand to 40 tokens
    logits = lambda result: {item.index: item.score for item in result.items}
    assert logits(asked) == pytest.approx(logits(by_hand), abs=1e-6) == logits(awaited)
    # And without it the long passage is scored on all the pair has room for: another score
    assert client.rerank_passages(QUERY, [LONG], timeout=60).items[0].score != pytest.approx(logits(by_hand)[0], abs=1e-4)


@pytest.mark.integration
def test_a_two_stage_job_with_truncate_never_is_refused_by_the_worker_naming_the_paper(client):
    papers = [{"id": "short", "title": CORPUS[1], "text": CORPUS[2]}, {"id": "long-one", "title": CORPUS[3], "text": LONG}]
    # When stage 1 would have to cut the long paper's abstract to fit its pair
    with pytest.raises(InvalidRequest, match=r"candidate 'long-one' has more tokens than the \d+ its pair has room for"):
        client.two_stage(QUERY, papers, top_k_docs=2, truncate="never", timeout=60)
    # Then with the cut allowed at 40 tokens the same job ranks both papers
    result = client.two_stage(QUERY, papers, top_k_docs=2, max_passage_tokens=N, timeout=60)
    assert {item.id for item in result.documents.items} == {"short", "long-one"}


# Through the gateway -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, shared_worker, redis_server, tiny_model) -> Iterator[Gateway]:
    gw = Gateway(tmp_path_factory.mktemp("gateway"), redis_server.url, tiny_model, {"RERANK_MAX_TEXT_CHARS": "30000"})
    gw.wait_until("/ready")
    yield gw
    gw.stop()


@pytest.mark.integration
def test_cohere_max_tokens_per_doc_cuts_each_document_to_that_many_tokens(gateway, client, engine, tiny_model):
    import cohere

    cut = cut_by_hand(engine, LONG, N)
    co = cohere.ClientV2(base_url=gateway.url, api_key=KEY)
    # When the cohere SDK asks for at most 40 tokens per document
    asked = co.rerank(model=str(tiny_model), query=QUERY, documents=[CORPUS[7], LONG], max_tokens_per_doc=N)
    # Then the long document scores as itself cut to 40 tokens, the short one as it is
    expected = {item.index: item.score for item in client.rerank_passages(QUERY, [CORPUS[7], cut], timeout=60).items}
    assert {r.index: r.relevance_score for r in asked.results} == pytest.approx(expected, abs=1e-6)


@pytest.mark.integration
def test_tei_truncate_false_refuses_an_over_long_text_and_left_cuts_its_start(gateway, client, engine):
    tei = httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    # When a TEI client refuses truncation and one text is too long for its pair
    refused = tei.post("/rerank", json={"query": QUERY, "texts": [CORPUS[1], LONG], "truncate": False})
    # Then it is a 422 naming that text, not a silent cut
    assert refused.status_code == 422, refused.text
    assert "texts.1" in refused.text and "truncate=never" in refused.text
    # And with truncation_direction Left the text's start is cut: it scores as its last tokens that fit the pair
    query = query_for_a_clean_tail(engine, LONG)
    tail = cut_by_hand(engine, LONG, room(engine, query), end=False)
    left = tei.post("/rerank", json={"query": query, "texts": [LONG], "truncate": True, "truncation_direction": "Left"})
    assert left.status_code == 200, left.text
    assert left.json()[0]["score"] == pytest.approx(client.rerank_passages(query, [tail], timeout=60).items[0].score, abs=1e-6)
    right = tei.post("/rerank", json={"query": query, "texts": [LONG], "truncation_direction": "Right"})
    assert right.json()[0]["score"] != pytest.approx(left.json()[0]["score"], abs=1e-4)
