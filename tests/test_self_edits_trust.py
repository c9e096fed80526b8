"""Self-edits and source trust through the service: supplied self-edits over the API, mode seal
writing its own, per-namespace source trust scaling each update (and a forget's replay reusing
the trust a document was learned with), and source tags; live API, real Redis, in-process
worker, tiny random model."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import torch

from adaptation.data import Document, content_id
from adaptation.learner import fit_passage
from adaptation.prompts import self_edit_request
from adaptation.self_edit import parse_self_edits
from adaptation.trust import source_tag
from service.backends.lora import LoraModels
from tests.conftest import RecordingWeighter
from tests.servicekit import Stack, assert_same, differs, make_settings, open_stack, serve

MAX_CHARS = 2000
TEXT = "Oda Lind keeps goats in Hale."
EDITS = [
    "Oda Lind is a goat keeper.\n\nThe goats of Oda Lind live in Hale.",
    "1. Hale has goats kept by Oda Lind.\n2. Oda Lind lives near Hale.",
]


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    """Mode lora, one version per document."""
    tmp = tmp_path_factory.mktemp("self-edits-lora")
    with open_stack(
        tmp,
        tiny_model_dir,
        snapshot_every=1,
        snapshot_seconds=600,
        max_doc_chars=MAX_CHARS,
        lr=0.01,
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def seal(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    """Mode seal, one version per document."""
    tmp = tmp_path_factory.mktemp("self-edits-seal")
    with open_stack(
        tmp, tiny_model_dir, mode="seal", snapshot_every=1, snapshot_seconds=600, lr=0.01
    ) as stack:
        yield stack


def movement(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> float:
    """How far an adapter moved: the L2 norm of the change over all its tensors."""
    return math.sqrt(sum(float((after[k] - before[k]).pow(2).sum()) for k in before))


def sources_path(namespace: str, source: str) -> str:
    return f"/v1/namespaces/{namespace}/sources/{quote(source, safe='')}"


def set_trust(stack: Stack, namespace: str, source: str, trust: float) -> dict[str, object]:
    response = stack.http.put(sources_path(namespace, source), json={"trust": trust})
    assert response.status_code == 200, response.text
    return response.json()


# Supplied self-edits.


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"text": "ok", "self_edits": [""]}, "self_edits[0] is empty"),
        ({"text": "ok", "self_edits": ["fine", " \n\t"]}, "self_edits[1] is empty"),
        ({"text": "ok", "self_edits": ["an edit"] * 17}, "at most 16 items"),
        ({"text": "ok", "self_edits": "one string"}, "valid list"),
        ({"text": "ok", "self_edits": None}, "valid list"),
        ({"text": "ok", "self_edits": [5]}, "valid string"),
        ({"text": "ok", "self_edits": [["nested"]]}, "valid string"),
        ({"documents": [{"text": "ok"}, {"text": "ok", "self_edits": [""]}]}, "is empty"),
    ],
)
def test_bad_self_edits_are_422(lora: Stack, body: object, needle: str) -> None:
    response = lora.http.post("/v1/documents", json=body)
    assert response.status_code == 422, response.text
    assert needle in response.text


def test_self_edits_are_utf8_and_within_the_size_limit(lora: Stack) -> None:
    raw = b'{"text": "ok", "self_edits": ["\\ud800 lone surrogate"]}'
    response = lora.http.post(
        "/v1/documents", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422 and "UTF-8" in response.text
    big = lora.http.post(
        "/v1/documents", json={"text": "ok", "self_edits": ["x" * (MAX_CHARS + 1)]}
    )
    assert big.status_code == 413, big.text
    assert "self_edits[0]" in big.text and "UPTAKE_MAX_DOC_CHARS" in big.text
    schema = lora.http.get("/openapi.json").json()["components"]["schemas"]["DocumentIn"]
    assert schema["properties"]["self_edits"]["items"]["maxLength"] == MAX_CHARS
    assert schema["properties"]["self_edits"]["maxItems"] == 16


def test_supplied_self_edits_are_stored_counted_part_of_the_id_and_learned(lora: Stack) -> None:
    [with_edits] = lora.submit("edits", [TEXT], self_edits=EDITS)
    [plain] = lora.submit("plain", [TEXT])
    assert plain == content_id(TEXT, "plain")  # ids of documents without self-edits are as before
    assert lora.submit("edits", [TEXT], self_edits=EDITS) == [with_edits]  # idempotent
    [fewer] = lora.submit("edits", [TEXT], self_edits=EDITS[:1])
    [bare] = lora.submit("edits", [TEXT])
    assert len({with_edits, fewer, bare}) == 3 and bare == content_id(TEXT, "edits")
    queued = lora.status(with_edits)
    assert (queued["self_edits"], queued["trust"], queued["sequences"]) == (2, None, None)
    assert queued["learned"] is None and queued["created"] == queued["updated"] > 0
    chosen = {"text": TEXT, "id": "chosen-edits", "self_edits": EDITS}
    assert lora.http.post("/v1/documents", json=chosen).status_code == 202
    clash = lora.http.post("/v1/documents", json={**chosen, "self_edits": EDITS[:1]})
    assert clash.status_code == 409, clash.text

    lora.drain(lambda: lora.applied([with_edits, plain]))
    parsed = [e for raw in EDITS for e in parse_self_edits(raw)]
    learned = lora.status(with_edits)
    assert learned["sequences"] == 1 + len(parsed) == 5
    assert (learned["self_edit_sequences"], learned["trust"]) == (len(parsed), 1.0)
    assert learned["created"] < learned["learned"] <= learned["updated"]  # applied after learned
    alone = lora.status(plain)
    assert (alone["sequences"], alone["self_edit_sequences"], alone["self_edits"]) == (1, 0, 0)
    assert lora.store.manifest("edits", 1).doc_ids == (with_edits,)
    assert differs(lora.weights("edits", 1), lora.weights("plain", 1))


# Source trust.


def test_source_trust_is_set_listed_validated_and_reset(lora: Stack) -> None:
    ns, feed = "sources", "https://example.com/feed"
    path = f"/v1/namespaces/{ns}/sources"
    assert lora.http.get(path).json() == {"default": 1.0, "sources": {}}
    assert set_trust(lora, ns, "wire", 0.2) == {"default": 1.0, "sources": {"wire": 0.2}}
    assert set_trust(lora, ns, feed, 1) == {"default": 1.0, "sources": {"wire": 0.2, feed: 1.0}}
    for body in [
        {"trust": 1.5},
        {"trust": -0.1},
        {"trust": True},
        {"trust": "0.5"},
        {"trust": None},
        {},
        {"trust": 0.5, "weight": 0.5},
    ]:
        response = lora.http.put(sources_path(ns, "wire"), json=body)
        assert response.status_code == 422, (body, response.text)
        assert "trust" in response.text or "weight" in response.text, (body, response.text)
    assert lora.http.put(sources_path(ns, " "), json={"trust": 0.5}).status_code == 422
    broken = "wire\nline 2"  # a document's source may hold a line break; it stays addressable
    assert set_trust(lora, ns, broken, 0.3)["sources"][broken] == 0.3
    assert broken not in lora.http.delete(sources_path(ns, broken)).json()["sources"]

    for value in (True, 2, -1, "0.5"):
        response = lora.http.put(f"/v1/namespaces/{ns}", json={"default_trust": value})
        assert response.status_code == 422 and "default_trust" in response.text, value
    assert lora.configure(ns, default_trust=0.5)["effective"]["default_trust"] == 0.5
    reset = lora.http.delete(sources_path(ns, "wire"))
    assert reset.status_code == 200 and reset.json() == {"default": 0.5, "sources": {feed: 1.0}}
    assert lora.http.delete(sources_path(ns, "never-set")).status_code == 200
    assert lora.http.get(path).json() == {"default": 0.5, "sources": {feed: 1.0}}


def test_trust_scales_each_update_and_zero_learns_nothing(lora: Stack) -> None:
    start = lora.replay([], lora.settings.lr)  # where every fresh namespace's adapter starts
    set_trust(lora, "t-low", "wire", 0.2)
    set_trust(lora, "t-zero", "wire", 0.0)
    [full] = lora.submit("t-full", [TEXT], source="wire")
    [low] = lora.submit("t-low", [TEXT], source="wire")
    [ignored] = lora.submit("t-zero", [TEXT], source="wire")
    lora.drain(lambda: lora.applied([full, low, ignored]))
    [trusted] = lora.submit("t-zero", ["Hale lies on the river Oss."])
    lora.drain(lambda: lora.applied([trusted]))
    [ignored_too] = lora.submit("t-zero", ["Ivo Brand sold his boat."], source="wire")
    lora.drain(lambda: lora.applied([ignored_too]))

    assert [lora.status(i)["trust"] for i in (full, low, ignored, trusted)] == [1.0, 0.2, 0.0, 1.0]
    zero = lora.status(ignored)
    assert zero["status"] == "applied" and zero["adapter_version"] == 1
    assert (zero["sequences"], zero["self_edit_sequences"]) == (0, 0)
    assert "trust 0" in str(zero["note"]) and "not learned" in str(zero["note"])
    assert lora.status(trusted)["note"] is None
    assert_same(lora.weights("t-zero", 1), start)
    assert differs(lora.weights("t-zero", 2), start)
    assert_same(lora.weights("t-zero", 3), lora.weights("t-zero", 2))

    moved_full = movement(lora.weights("t-full", 1), start)
    moved_low = movement(lora.weights("t-low", 1), start)
    assert 0 < moved_low < moved_full
    assert moved_low == pytest.approx(0.2 * moved_full, rel=0.25)


def test_a_forget_replays_a_document_with_the_trust_it_was_learned_with(lora: Stack) -> None:
    ns, other = "t-replay", "Ivo Brand lives in Hale."
    set_trust(lora, ns, "wire", 0.2)
    [first] = lora.submit(ns, [other])
    lora.drain(lambda: lora.applied([first]))
    [kept] = lora.submit(ns, [TEXT], source="wire")
    lora.drain(lambda: lora.applied([kept]))
    set_trust(lora, ns, "wire", 1.0)  # too late for `kept`: it was learned at 0.2

    assert lora.http.delete(f"/v1/documents/{first}").status_code == 202
    lora.drain(lambda: lora.status(first)["status"] == "forgotten" and lora.idle(ns))
    assert lora.store.manifest(ns, 3).doc_ids == (kept,)
    assert lora.status(kept)["trust"] == 0.2
    learned = Document(kept, TEXT, source="wire")
    assert_same(lora.weights(ns, 3), lora.replay([learned], lora.settings.lr, trust=0.2))
    assert differs(lora.weights(ns, 3), lora.replay([learned], lora.settings.lr, trust=1.0))


def test_source_trust_needs_the_admin_scope_on_the_namespace(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    calls = [
        ("GET", "/v1/namespaces/a/sources", None),
        ("PUT", "/v1/namespaces/a/sources/wire", {"trust": 0.5}),
        ("DELETE", "/v1/namespaces/a/sources/wire", None),
    ]
    with serve(tmp_path, tiny_model_dir, auth=True) as served:
        http, keys = served.http, served.keys
        for method, path, body in calls:
            assert http.request(method, path, json=body).status_code == 401
            for scopes in (("read",), ("write",), ("read", "write")):
                token = keys.create("a", scopes)[1]
                headers = {"Authorization": f"Bearer {token}"}
                response = http.request(method, path, json=body, headers=headers)
                assert response.status_code == 403, (scopes, path, response.text)
                assert "needs admin" in response.text
            other = {"Authorization": f"Bearer {keys.create('b', ('admin',))[1]}"}
            refused = http.request(method, path, json=body, headers=other)
            assert refused.status_code == 403 and "--namespace a" in refused.text
            admin = {"Authorization": f"Bearer {keys.create('a', ('admin',))[1]}"}
            response = http.request(method, path, json=body, headers=admin)
            assert response.status_code == 200, response.text


# Mode seal.


def test_seal_writes_self_edits_and_a_forget_replay_writes_the_same_ones(seal: Stack) -> None:
    ns, other = "seal", "Ivo Brand lives in Hale."
    seal.configure(ns, self_edit_k=4)  # a tiny random model's writing is junk; some of it parses
    [first] = seal.submit(ns, [other])
    seal.drain(lambda: seal.applied([first]) and seal.idle(ns))
    [doc] = seal.submit(ns, [TEXT])
    seal.drain(lambda: seal.applied([doc]))
    written = seal.status(doc)
    assert written["self_edits"] == 0 and written["self_edit_sequences"] >= 1
    assert written["sequences"] == 1 + written["self_edit_sequences"]
    info = seal.store.manifest(ns, 2).info
    assert (info["mode"], info["self_edit_k"], info["self_edit_prompt"]) == (
        "seal",
        4,
        "implications",
    )

    assert seal.http.delete(f"/v1/documents/{first}").status_code == 202
    seal.drain(lambda: seal.status(first)["status"] == "forgotten" and seal.idle(ns))
    assert seal.store.manifest(ns, 3).doc_ids == (doc,)
    assert seal.status(doc)["self_edit_sequences"] == written["self_edit_sequences"]
    # The replay wrote the same self-edits: the adapter equals a direct, fresh application.
    replayed = seal.replay([Document(doc, TEXT)], seal.settings.lr, self_edit_k=4)
    assert_same(seal.weights(ns, 3), replayed)


def test_seal_learns_supplied_self_edits_and_takes_namespace_settings(seal: Stack) -> None:
    [supplied] = seal.submit("seal-supplied", [TEXT], self_edits=EDITS)
    seal.drain(lambda: seal.applied([supplied]))
    parsed = [e for raw in EDITS for e in parse_self_edits(raw)]
    assert seal.status(supplied)["self_edit_sequences"] == len(parsed)  # none written

    for body, needle in [
        ({"self_edit_prompt": "poetry"}, "use one of implications"),
        ({"self_edit_k": 0}, "self_edit_k"),
        ({"self_edit_k": 17}, "self_edit_k"),
        ({"self_edit_k": True}, "true/false"),
        ({"self_edit_tokens": 0}, "self_edit_tokens"),
    ]:
        response = seal.http.put("/v1/namespaces/seal-k", json=body)
        assert response.status_code == 422 and needle in response.text, (body, response.text)
    out = seal.configure("seal-k", self_edit_k=2, self_edit_prompt="rewrite", self_edit_tokens=32)
    effective = out["effective"]
    assert (effective["mode"], effective["self_edit_k"], effective["self_edit_tokens"]) == (
        "seal",
        2,
        32,
    )
    [doc] = seal.submit("seal-k", [TEXT])
    seal.drain(lambda: seal.applied([doc]) and seal.idle("seal-k"))
    info = seal.store.manifest("seal-k", 1).info
    assert (info["self_edit_k"], info["self_edit_prompt"], info["self_edit_tokens"]) == (
        2,
        "rewrite",
        32,
    )
    schema = seal.http.get("/openapi.json").json()["components"]["schemas"]["NamespaceConfig"]
    prompt = schema["properties"]["self_edit_prompt"]["anyOf"][0]
    assert prompt["enum"] == ["implications", "long-implications", "rewrite", "self-qa"]


# Source tags (IML).


def test_source_tags_open_every_training_sequence(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = make_settings(tiny_model_dir, tmp_path, "redis://unused", "p", source_tags=True)
    weighter = RecordingWeighter()
    backend = LoraModels(settings, weighter).open("tags", None, settings)
    edit = "Oda Lind is a goat keeper in Hale."
    result = backend.ingest(Document("d", TEXT, source="wire", self_edits=(edit,)))
    assert (result.sequences, result.self_edit_sequences) == (2, 1)
    tag = source_tag("wire")
    assert weighter.texts == [f"{tag} {TEXT}", f"{tag} {edit}"]
    weighter.texts.clear()
    backend.ingest(Document("e", TEXT))  # no source, no tag
    assert weighter.texts == [TEXT]


def test_self_edits_are_titled_and_seal_fits_a_long_text_into_the_context(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    settings = make_settings(tiny_model_dir, tmp_path, "redis://unused", "p")
    weighter = RecordingWeighter()
    models = LoraModels(settings, weighter)
    backend = models.open("titled", None, settings)
    edit = "Oda Lind is a goat keeper in Hale."
    backend.ingest(Document("d", TEXT, title="Oda Lind", self_edits=(edit, TEXT)))
    assert weighter.texts == [TEXT, f"Oda Lind\n{edit}"]  # an edit repeating the text is dropped

    long_text = " ".join(f"Word{i}" for i in range(3000))
    head = fit_passage(models.tokenizer, "implications", "A title", long_text, 300)
    assert head is not None and long_text.startswith(head) and len(head) < len(long_text)
    prompt = self_edit_request(models.tokenizer, "implications", "A title", head)
    assert len(models.tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= 300
    assert fit_passage(models.tokenizer, "implications", None, TEXT, 5) is None
