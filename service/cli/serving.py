"""The service's commands: `uptake up`, `serve`, `worker`, `keys` and `fit-tfidf`.

Each handler imports what it runs, so `uptake --help` and argument errors come back without
loading torch; nothing here imports the lab.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.settings import Settings


def service_settings(args: argparse.Namespace) -> Settings:
    """Settings from UPTAKE_* variables, with the flags given on the command line on top; a bad
    value ends the command with one line naming the flag or variable, not a traceback."""
    from pydantic import ValidationError

    from service.settings import Settings

    flags = {k: getattr(args, k, None) for k in ("model", "host", "port", "strategy")}
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:

        def source(field: str) -> str:
            return f"--{field}" if field in given else f"UPTAKE_{field.upper()}"

        problems = "; ".join(
            f"{source('_'.join(map(str, e['loc'])))}: {e['msg']}" for e in exc.errors()
        )
        print(f"uptake {args.command}: {problems}", file=sys.stderr)
        raise SystemExit(2) from None


def checked_settings(args: argparse.Namespace) -> Settings | None:
    """The service settings, or None (with the reason printed) when the mode cannot run: before
    any model loads or child process starts. Mode mac also checks the stored banks against its
    networks."""
    from service.settings import ConfigError

    settings = service_settings(args)
    try:
        settings.check()
        if settings.mode == "mac":
            from service.backends.mac import check_banks

            check_banks(settings)
    except ConfigError as exc:
        print(f"uptake {args.command}: {exc}", file=sys.stderr)
        return None
    return settings


def _service_logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _service_flags(p: argparse.ArgumentParser, http: bool) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="base model: a packaged base's short name (default smollm2-135m-instruct; or "
        "gemma3-270m), a local Hugging Face directory or a hub id (UPTAKE_MODEL)",
    )
    if http:
        p.add_argument("--host", default=None, help="address to bind (UPTAKE_HOST)")
        p.add_argument("--port", type=int, default=None, help="port to bind (UPTAKE_PORT)")


def add_fit_tfidf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit-tfidf",
        help="fit the tfidf weighting's word statistics, for UPTAKE_STRATEGY=tfidf",
        description="Counts in how many of the given documents each word appears and saves the "
        "idf table as JSON: set UPTAKE_WEIGHTER to it. Fit it on text like what the service "
        "will be sent; words it never saw count as the rarest, so new names weigh most.",
    )
    p.add_argument(
        "data", nargs="+", help="documents: JSONL, a JSON list or SQuAD-style JSON (several files)"
    )
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument(
        "--quantile",
        type=float,
        default=None,
        help="zero each document's words below this quantile of its tf-idf (default: keep all)",
    )
    p.set_defaults(handler=_run_fit_tfidf)


def _run_fit_tfidf(args: argparse.Namespace) -> int:
    from adaptation.data import read_documents
    from adaptation.weighting.tfidf import TfidfWeighter

    try:
        texts = [doc.text for path in args.data for doc in read_documents(path)]
        weighter = TfidfWeighter(args.quantile).fit(texts)
    except (OSError, ValueError) as exc:
        print(f"uptake fit-tfidf: {exc}", file=sys.stderr)
        return 2
    path = weighter.save(args.out)
    print(f"tf-idf of {len(weighter.idf)} words over {weighter.n_docs} documents: {path}")
    return 0


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the HTTP API and the serving engine")
    _service_flags(p, http=True)
    p.set_defaults(handler=_run_serve)


def _run_process(args: argparse.Namespace, main: Callable[[Settings], object]) -> int:
    """The shared life of a service process: settings, logging, threads, and the embedded Redis
    closed on the way out."""
    from service.redis_conn import close_embedded

    _service_logging()
    settings = checked_settings(args)
    if settings is None:
        return 2
    settings.apply_torch_threads()
    try:
        main(settings)
    finally:
        close_embedded()
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api import create_app

    return _run_process(args, lambda s: uvicorn.run(create_app(s), host=s.host, port=s.port))


def add_worker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run the worker that folds queued documents into adapters")
    _service_flags(p, http=False)
    p.set_defaults(handler=_run_worker)


def _run_worker(args: argparse.Namespace) -> int:
    from service.worker import Worker

    return _run_process(args, lambda s: Worker(s).run_forever())


def add_up(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "up",
        help="run everything on this machine: embedded Redis, worker and API",
        description="Starts an embedded Redis (unless UPTAKE_REDIS_URL is set), the worker and "
        "the API, on the base UPTAKE_MODEL names (default: the packaged SmolLM2-135M-Instruct, "
        "converted once on first start). Builds nothing else. Ctrl-C stops everything.",
    )
    _service_flags(p, http=True)
    p.set_defaults(handler=_run_up)


def _run_up(args: argparse.Namespace) -> int:
    from service.supervisor import run_up

    _service_logging()
    settings = checked_settings(args)
    return 2 if settings is None else run_up(settings)


def add_keys(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "keys",
        help="create, list and revoke API keys",
        description="API keys live, hashed, in the service's Redis: UPTAKE_REDIS_URL, else the "
        "embedded server under UPTAKE_STORE_DIR (the one `uptake up` uses). See docs/security.md.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create", help="create a key; its token is printed once, as the last line"
    )
    create.add_argument(
        "--namespace", required=True, help="the namespace the key is for, or '*' for every one"
    )
    create.add_argument(
        "--scope",
        action="append",
        required=True,
        help="read (answers), write (ingest) or admin; repeat for several",
    )
    create.add_argument(
        "--rate-limit",
        type=int,
        default=None,
        help="requests per minute for this key (default UPTAKE_RATE_LIMIT_PER_MINUTE; 0: none)",
    )
    actions.add_parser("list", help="list the keys (never their tokens)")
    revoke = actions.add_parser("revoke", help="revoke a key: its token stops working at once")
    revoke.add_argument("id", help="the key's id, as `uptake keys list` shows it")
    p.set_defaults(handler=_run_keys)


def _run_keys(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    import redis

    from service.auth import KeyStore
    from service.keys import Keys
    from service.redis_conn import close_embedded, connect

    settings = service_settings(args)
    client = connect(settings)
    store = KeyStore(client, Keys(settings.redis_prefix))
    try:
        if args.action == "create":
            key, token = store.create(args.namespace, tuple(args.scope), args.rate_limit)
            limit = settings.rate_limit_per_minute if key.rate_limit is None else key.rate_limit
            rate = f"{limit} requests per minute" if limit else "no rate limit"
            print(
                f"created API key {key.id} for namespace {key.namespace!r}, scopes "
                f"{', '.join(key.scopes)}, {rate}. Keep the token below secret; it is not "
                "shown again:"
            )
            print(token)
        elif args.action == "list":
            for key in store.list_keys():
                created = datetime.fromtimestamp(key.created, timezone.utc).isoformat(
                    timespec="seconds"
                )
                limit = "default" if key.rate_limit is None else str(key.rate_limit)
                print(
                    f"{key.id}  namespace={key.namespace}  scopes={','.join(key.scopes)}  "
                    f"rate_limit={limit}  created={created}"
                )
        elif not store.revoke(args.id):
            print(
                f"uptake keys revoke: no API key with id {args.id!r}; see `uptake keys list`",
                file=sys.stderr,
            )
            return 2
        else:
            print(f"revoked API key {args.id}")
    except ValueError as exc:
        print(f"uptake keys {args.action}: {exc}", file=sys.stderr)
        return 2
    except redis.RedisError as exc:
        print(f"uptake keys: Redis is unreachable ({exc}); check UPTAKE_REDIS_URL", file=sys.stderr)
        return 1
    finally:
        client.close()
        close_embedded()
    return 0
