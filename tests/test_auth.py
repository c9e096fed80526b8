"""API keys over a live uvicorn and a real Redis: 401, 403, 429, hashing, the CLI, and Redis down."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from service.auth import KeyStore, Scope, token_digest
from service.cli import main
from service.keys import Keys
from service.redis_conn import client
from service.settings import Settings
from service.supervisor import child_env
from tests.servicekit import api_client, disposable_redis, make_settings, serve, unique_prefix

# Every endpoint behind a key, with a request it accepts: (method, path, JSON body).
GUARDED = [
    ("POST", "/v1/documents", {"text": "Alda Venn moved to Port Selka."}),
    ("GET", "/v1/documents/some-id", None),
    ("POST", "/v1/answer", {"question": "Where?", "max_new_tokens": 2}),
    ("GET", "/v1/adapters", None),
    ("GET", "/v1/status", None),
    ("POST", "/v1/completions", {"prompt": "Alda", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Who?"}]}),
    ("GET", "/v1/models", None),
    ("PUT", "/v1/namespaces/default", {"lr": 0.001}),
    ("GET", "/v1/namespaces/default", None),
    ("POST", "/v1/namespaces/default/rollback", {"version": 0}),
    ("DELETE", "/v1/documents/some-id", None),
    ("GET", "/v1/namespaces/default/sources", None),
    ("PUT", "/v1/namespaces/default/sources/wire", {"trust": 0.5}),
    ("DELETE", "/v1/namespaces/default/sources/wire", None),
]


@dataclass
class AuthApi:
    http: httpx.Client
    redis: redis.Redis
    store: KeyStore
    url: str
    prefix: str

    def token(self, namespace: str, *scopes: Scope, rate_limit: int | None = None) -> str:
        return self.store.create(namespace, scopes, rate_limit)[1]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[AuthApi]:
    with serve(tmp_path_factory.mktemp("auth"), tiny_model_dir, auth=True) as s:
        yield AuthApi(s.http, s.redis, s.keys, s.settings.redis_url, s.settings.redis_prefix)


def _detail(response: httpx.Response) -> str:
    return str(response.json()["detail"])


@pytest.mark.parametrize(("method", "path", "body"), GUARDED)
def test_missing_key_is_401(api: AuthApi, method: str, path: str, body: object) -> None:
    response = api.http.request(method, path, json=body)
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "Authorization: Bearer" in _detail(response) and "uptake keys create" in _detail(
        response
    )


def test_malformed_or_unknown_key_is_401(api: AuthApi) -> None:
    doc = {"text": "Anything."}
    basic = api.http.post("/v1/documents", json=doc, headers={"Authorization": "Basic dTpw"})
    assert basic.status_code == 401 and "`Bearer <key>`" in _detail(basic)
    real = api.token("default", "write")
    key_id = real.split("_")[1]
    for bad in ("not-a-key", f"uptake_{key_id}_wrong-secret", "uptake_000000000000_x", real + "x"):
        response = api.http.post("/v1/documents", json=doc, headers=bearer(bad))
        assert response.status_code == 401, bad
        assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
        assert "unknown or was revoked" in _detail(response)


def test_open_endpoints_need_no_key(api: AuthApi) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
        assert api.http.get(path).status_code == 200, path
    schema = api.http.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert schema["paths"]["/v1/answer"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "401" in schema["paths"]["/v1/documents"]["post"]["responses"]
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_wrong_scope_is_403(api: AuthApi) -> None:
    reader, writer = api.token("a", "read"), api.token("a", "write")
    ingest = api.http.post(
        "/v1/documents", json={"text": "x", "namespace": "a"}, headers=bearer(reader)
    )
    assert ingest.status_code == 403 and "needs write" in _detail(ingest)
    assert "--scope write" in _detail(ingest)
    ask = api.http.post(
        "/v1/answer", json={"question": "Who?", "namespace": "a"}, headers=bearer(writer)
    )
    assert ask.status_code == 403 and "needs read" in _detail(ask)
    chat = api.http.post(
        "/v1/chat/completions",
        json={"model": "a", "messages": [{"role": "user", "content": "Who?"}]},
        headers=bearer(writer),
    )
    assert chat.status_code == 403


def test_wrong_namespace_is_403(api: AuthApi) -> None:
    key = bearer(api.token("a", "read", "write"))
    one = api.http.post("/v1/documents", json={"text": "x", "namespace": "b"}, headers=key)
    assert one.status_code == 403 and "'b'" in _detail(one) and "--namespace b" in _detail(one)
    mixed = {"documents": [{"text": "ok", "namespace": "m"}, {"text": "no", "namespace": "b"}]}
    both = bearer(api.token("m", "write"))
    assert api.http.post("/v1/documents", json=mixed, headers=both).status_code == 403
    assert not api.redis.exists(Keys(api.prefix).stream("m"))  # nothing of the batch was queued
    for method, path, body, params in [
        ("POST", "/v1/answer", {"question": "Who?", "namespace": "b"}, None),
        ("POST", "/v1/completions", {"model": "b", "prompt": "Alda"}, None),
        ("GET", "/v1/status", None, {"namespace": "b"}),
        ("GET", "/v1/adapters", None, {"namespace": "b"}),
        ("GET", "/v1/status", None, None),  # the namespace defaults to "default"
    ]:
        response = api.http.request(method, path, json=body, params=params, headers=key)
        assert response.status_code == 403, (path, response.text)


def test_right_key_is_admitted_and_tenants_stay_apart(api: AuthApi) -> None:
    writer_a, reader_a = bearer(api.token("a", "write")), bearer(api.token("a", "read"))
    accepted = api.http.post(
        "/v1/documents", json={"text": "Tenant A's fact.", "namespace": "a"}, headers=writer_a
    )
    assert accepted.status_code == 202, accepted.text
    doc_id = accepted.json()["id"]
    assert api.http.get(f"/v1/documents/{doc_id}", headers=writer_a).status_code == 200
    assert api.http.get(f"/v1/documents/{doc_id}", headers=reader_a).status_code == 200
    answer = api.http.post(
        "/v1/answer",
        json={"question": "Who?", "namespace": "a", "max_new_tokens": 2},
        headers=reader_a,
    )
    assert answer.status_code == 200 and answer.json()["namespace"] == "a"
    assert (
        api.http.get("/v1/status", params={"namespace": "a"}, headers=reader_a).status_code == 200
    )
    models = api.http.get("/v1/models", headers=reader_a).json()
    assert [m["id"] for m in models["data"]] == ["a"]

    # Tenant B cannot tell that A's document exists: it is missing, as an unknown id is.
    reader_b = bearer(api.token("b", "read", "write"))
    assert api.http.get(f"/v1/documents/{doc_id}", headers=reader_b).status_code == 404
    waited = api.http.post(
        "/v1/answer",
        json={"question": "?", "namespace": "b", "wait_for": [doc_id]},
        headers=reader_b,
    )
    assert waited.status_code == 404 and doc_id in _detail(waited)

    everything = bearer(api.token("*", "read"))
    assert api.http.get(f"/v1/documents/{doc_id}", headers=everything).status_code == 200
    names = [m["id"] for m in api.http.get("/v1/models", headers=everything).json()["data"]]
    assert "default" in names


def test_admin_operations_need_the_admin_scope_on_the_namespace(api: AuthApi) -> None:
    writer_b = bearer(api.token("adm-b", "write"))
    other = api.http.post(
        "/v1/documents", json={"text": "Tenant B's fact.", "namespace": "adm-b"}, headers=writer_b
    )
    own = api.http.post(
        "/v1/documents",
        json={"text": "Tenant A's fact.", "namespace": "adm-a"},
        headers=bearer(api.token("adm-a", "write")),
    )
    b_doc, a_doc = other.json()["id"], own.json()["id"]
    admin_ops = [
        ("PUT", "/v1/namespaces/adm-a", {"lr": 0.002}),
        ("GET", "/v1/namespaces/adm-a", None),
        ("POST", "/v1/namespaces/adm-a/rollback", {"version": 0}),
        ("DELETE", f"/v1/documents/{a_doc}", None),
    ]
    for scopes in (("read",), ("write",), ("read", "write")):
        key = bearer(api.token("adm-a", *scopes))
        for method, path, body in admin_ops:
            response = api.http.request(method, path, json=body, headers=key)
            assert response.status_code == 403, (scopes, path, response.text)
            assert "needs admin" in _detail(response) and "--scope admin" in _detail(response)

    admin_a = bearer(api.token("adm-a", "admin"))
    for method, path, body in [
        ("PUT", "/v1/namespaces/adm-b", {"lr": 0.002}),
        ("GET", "/v1/namespaces/adm-b", None),
        ("POST", "/v1/namespaces/adm-b/rollback", {"version": 0}),
    ]:
        response = api.http.request(method, path, json=body, headers=admin_a)
        assert response.status_code == 403 and "--namespace adm-b" in _detail(response), path
    # Another tenant's document is as unknown as a missing one, and nothing is queued for it.
    for doc_id in (b_doc, "no-such-document"):
        response = api.http.delete(f"/v1/documents/{doc_id}", headers=admin_a)
        assert response.status_code == 404 and doc_id in _detail(response)
    assert not api.redis.exists(Keys(api.prefix).operations("adm-b"))

    configured = api.http.put("/v1/namespaces/adm-a", json={"lr": 0.002}, headers=admin_a)
    assert configured.status_code == 200 and configured.json()["config"]["lr"] == 0.002
    forget = api.http.delete(f"/v1/documents/{a_doc}", headers=admin_a)
    assert forget.status_code == 202 and forget.json()["document"] == a_doc
    pending = api.http.get("/v1/namespaces/adm-a", headers=admin_a).json()["pending_operations"]
    assert [op["operation"] for op in pending] == ["configure", "forget"]
    assert api.http.get(f"/v1/documents/{a_doc}", headers=admin_a).status_code == 200
    current = api.http.post("/v1/namespaces/adm-a/rollback", json={"version": 0}, headers=admin_a)
    assert current.status_code == 409 and "already current" in _detail(current)


def test_every_scope_on_one_namespace_still_reaches_nothing_of_another(api: AuthApi) -> None:
    """What the tests above leave out: chat naming the other namespace, an admin key (which
    may look up any document of its own namespace) asking for the other's document, and a
    document sent under an id the other namespace already uses."""
    other = api.http.post(
        "/v1/documents",
        json={"text": "Tenant B's own fact.", "namespace": "iso-b"},
        headers=bearer(api.token("iso-b", "write")),
    )
    b_doc = other.json()["id"]
    key = bearer(api.token("iso-a", "read", "write", "admin"))
    chat = api.http.post(
        "/v1/chat/completions",
        json={"model": "iso-b", "messages": [{"role": "user", "content": "Who?"}]},
        headers=key,
    )
    assert chat.status_code == 403 and "--namespace iso-b" in _detail(chat)
    lookup = api.http.get(f"/v1/documents/{b_doc}", headers=key)
    assert lookup.status_code == 404 and "Tenant B" not in lookup.text
    # Ids are global, so reusing B's id is refused; the refusal does not name B's namespace.
    clash = {"id": b_doc, "text": "Tenant A's fact.", "namespace": "iso-a"}
    refused = api.http.post("/v1/documents", json=clash, headers=key)
    assert refused.status_code == 409 and "iso-b" not in refused.text


def test_keys_are_stored_hashed(api: AuthApi) -> None:
    token = api.token("hashed", "read")
    secret = token.split("_", 2)[2]
    stored = []
    for name in api.redis.scan_iter(f"{api.prefix}:*"):
        kind = api.redis.type(name)
        if kind == "hash":
            stored.extend(api.redis.hgetall(name).values())
        elif kind == "string":
            stored.append(api.redis.get(name))
    assert not any(secret in value for value in stored)
    assert any(token_digest(token) in value for value in stored)


def test_rate_limit_gives_429_with_retry_after(api: AuthApi) -> None:
    limit = 3
    limited = bearer(api.token("rl", "read", rate_limit=limit))
    codes = []
    # A fixed one-minute window: even across a window edge, 2 × limit + 1 requests exceed it.
    for _ in range(2 * limit + 1):
        response = api.http.get("/v1/adapters", params={"namespace": "rl"}, headers=limited)
        codes.append(response.status_code)
        if response.status_code == 429:
            break
    assert codes[-1] == 429 and limit <= codes.count(200) <= 2 * limit, codes
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert "over its limit of 3 requests per minute" in _detail(response)
    other = bearer(api.token("rl", "read"))
    assert (
        api.http.get("/v1/adapters", params={"namespace": "rl"}, headers=other).status_code == 200
    )


def test_cli_creates_lists_and_revokes_keys(
    api: AuthApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("UPTAKE_REDIS_URL", api.url)
    monkeypatch.setenv("UPTAKE_REDIS_PREFIX", api.prefix)
    assert (
        main(["keys", "create", "--namespace", "cli", "--scope", "write", "--scope", "read"]) == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "namespace 'cli'" in lines[0] and "write" in lines[0]
    key = bearer(lines[-1])
    key_id = lines[-1].split("_")[1]
    doc = {"text": "Added with a key from the CLI.", "namespace": "cli"}
    assert api.http.post("/v1/documents", json=doc, headers=key).status_code == 202
    ask = {"question": "Who?", "namespace": "cli", "max_new_tokens": 2}
    assert api.http.post("/v1/answer", json=ask, headers=key).status_code == 200

    assert main(["keys", "list"]) == 0
    listed = capsys.readouterr().out
    assert f"{key_id}  namespace=cli  scopes=read,write" in listed and lines[-1] not in listed

    assert main(["keys", "revoke", key_id]) == 0
    assert api.http.post("/v1/documents", json=doc, headers=key).status_code == 401
    assert main(["keys", "revoke", key_id]) == 2
    assert main(["keys", "create", "--namespace", "cli", "--scope", "root"]) == 2
    assert main(["keys", "create", "--namespace", "no spaces", "--scope", "read"]) == 2
    errors = capsys.readouterr().err
    assert "uptake keys list" in errors and "read, write, admin" in errors
    assert "letters, digits" in errors


def test_confirmed_key_keeps_answering_while_redis_is_down(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    with disposable_redis() as (url, server):
        prefix = unique_prefix()
        settings = make_settings(tiny_model_dir, tmp_path / "store", url, prefix, auth=True)
        r = client(url)
        token = KeyStore(r, Keys(prefix)).create("default", ("read",))[1]
        r.close()
        ask = {"question": "Where?", "max_new_tokens": 2}
        with api_client(settings) as http:
            assert http.post("/v1/answer", json=ask, headers=bearer(token)).status_code == 200
            server.kill()
            server.wait()
            assert http.post("/v1/answer", json=ask, headers=bearer(token)).status_code == 200
            unconfirmed = http.post("/v1/answer", json=ask, headers=bearer(token + "x"))
            assert unconfirmed.status_code == 503 and "Redis is unreachable" in _detail(unconfirmed)


def test_auth_is_on_by_default_and_off_in_local_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UPTAKE_AUTH", raising=False)
    assert Settings().auth is True
    assert child_env(Settings(), "redis://x")["UPTAKE_AUTH"] == "false"
    assert child_env(Settings(auth=False), "redis://x")["UPTAKE_AUTH"] == "false"
    assert child_env(Settings(auth=True), "redis://x")["UPTAKE_AUTH"] == "true"
    monkeypatch.setenv("UPTAKE_AUTH", "true")
    assert child_env(Settings(), "redis://x")["UPTAKE_AUTH"] == "true"
