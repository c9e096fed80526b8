"""`uptake bench`: what the service costs, as ratios against bare loops measured in the same run.

Absolute times on a shared machine mean little, so every figure is paired with its baseline:
(a) the worker's documents per second through Redis, weighting and snapshots, against a bare
in-process loop doing the same update steps on the same model; (b) answers per second through
HTTP at several concurrencies, against sequential bare `generate` calls; (c) freshness (POST to an
answer from a version holding the document) at a sustained ingest rate; (d) what each document
costs at ingest and in storage.
"""

from __future__ import annotations

import itertools
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import torch

from adaptation.answering import generate_answers
from adaptation.data import Document
from adaptation.lab.live import live_service
from adaptation.lab.world import World, WorldConfig
from adaptation.learner import Learner, fresh_adapter
from adaptation.modeling import base_dtype, load_base
from service.backends.lora import LORA_SEED, build_weighter, learn_settings
from service.documents import DocumentStore
from service.redis_conn import redis_url
from service.settings import Settings
from service.worker import Worker

NAMESPACE = "bench"
WARMUP_DOCS = 2
FRESHNESS_SNAPSHOT_SECONDS = 1.0  # the freshness run's snapshot period


@dataclass(frozen=True)
class BenchConfig:
    docs: int = 48
    questions: int = 96
    concurrency: tuple[int, ...] = (1, 8, 32)
    # The largest concurrency is measured again, its questions spread over this many namespaces.
    namespaces: int = 4
    ingest_rate: float = 1.0  # documents per second for the freshness run
    freshness_docs: int = 20
    streamed: int = 8  # questions asked streamed and whole, one at a time

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(
            docs=16, questions=32, concurrency=(1, 8), ingest_rate=2.0, freshness_docs=6, streamed=3
        )


def stream_documents(n: int, seed: int = 7) -> list[Document]:
    """Knowledge-world articles about new people: realistic length, never seen by the model."""
    docs = World(WorldConfig(seed=seed)).stream(n + WARMUP_DOCS, "bench")
    return [d for d in docs if d.questions][: n + WARMUP_DOCS]


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# (a) Worker against a bare loop.


class BareLoop:
    """The worker's learner alone, on its own copy of the model: no Redis, queue or snapshots."""

    def __init__(self, settings: Settings) -> None:
        base, tokenizer = load_base(settings.model, settings.device, settings.torch_dtype())
        model = fresh_adapter(base, settings.lora(), LORA_SEED)
        self.learner = Learner(
            model, tokenizer, build_weighter(settings), settings.update(), learn_settings(settings)
        )
        self.batch = settings.learn_batch

    def run(self, texts: list[str]) -> None:
        """The documents in order, `UPTAKE_LEARN_BATCH` at a time as the worker takes them when
        they are all queued."""
        docs = [Document(f"bare-{i}", text, source="bench") for i, text in enumerate(texts)]
        for start in range(0, len(docs), self.batch):
            self.learner.learn_together([(doc, 1.0) for doc in docs[start : start + self.batch]])


def _drain(worker: Worker, store: DocumentStore, ids: list[str], timeout: float = 3600) -> None:
    """Turn the worker until every id is learned, then snapshot and publish at once: the last
    documents would otherwise wait out UPTAKE_SNAPSHOT_SECONDS, which is idle time, not cost."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker.run_once()
        records = store.statuses(ids).values()
        if any(r is not None and r.status == "dead" for r in records):
            raise RuntimeError("a benchmark document was dead-lettered; see the worker log")
        if all(r is not None and r.learned is not None for r in records):
            worker.flush()
            if all(r is not None and r.status == "applied" for r in store.statuses(ids).values()):
                return
    raise TimeoutError("the worker did not apply the benchmark documents in time")


def _apply(
    worker: Worker, store: DocumentStore, texts: list[str], namespace: str = NAMESPACE
) -> None:
    """Submit `texts` and turn the worker until all are applied and published."""
    _drain(worker, store, [store.submit(t, namespace, source="bench").id for t in texts])


def mixed_namespaces(n: int) -> list[str]:
    """The bench namespace and n - 1 others, each to hold a published adapter of its own."""
    return [NAMESPACE, *(f"{NAMESPACE}-{i}" for i in range(1, n))]


def worker_vs_bare(
    settings: Settings, texts: list[str], rounds: int = 3
) -> tuple[float, float, Worker]:
    """Documents per second of the bare loop and of the worker (submission to published
    snapshot), alternating in rounds over the same documents so that a slow spell on a shared
    machine hits both sides."""
    bare = BareLoop(settings)
    worker = Worker(settings)
    worker.load()
    store = worker.docs

    def through_worker(batch: list[str]) -> None:
        _apply(worker, store, batch)

    bare.run(texts[:WARMUP_DOCS])
    through_worker(texts[:WARMUP_DOCS])
    measured = texts[WARMUP_DOCS:]
    cuts = [len(measured) * r // rounds for r in range(rounds + 1)]
    seconds = {"bare": 0.0, "worker": 0.0}
    for start, end in itertools.pairwise(cuts):
        batch = measured[start:end]
        for side, run in (("bare", bare.run), ("worker", through_worker)):
            started = time.perf_counter()
            run(batch)
            seconds[side] += time.perf_counter() - started
    return len(measured) / seconds["bare"], len(measured) / seconds["worker"], worker


def ingest_costs(worker: Worker, texts: list[str]) -> dict[str, float]:
    """(d) Bytes each document leaves behind: its Redis record and its share of a snapshot."""
    store = worker.store
    latest = store.latest(NAMESPACE)
    snapshot = store.nbytes(NAMESPACE, latest)
    ids = list(store.lineage(NAMESPACE, latest))
    redis_bytes = sum(worker.redis.memory_usage(worker.keys.doc(i)) or 0 for i in ids)
    return {
        "documents": len(ids),
        "snapshot_bytes": snapshot,
        "snapshot_bytes_per_document": snapshot / max(1, len(ids)),
        "redis_bytes_per_document": redis_bytes / max(1, len(ids)),
        "text_chars_per_document": statistics.mean(len(t) for t in texts),
    }


def worker_ingest(settings: Settings, texts: list[str]) -> dict[str, float]:
    """(d) for a mode with no bare loop to pair with (mac): the worker's seconds per document
    after a warm-up, then what each document leaves behind."""
    worker = Worker(settings)
    worker.load()
    store = worker.docs
    try:
        _apply(worker, store, texts[:WARMUP_DOCS])
        started = time.perf_counter()
        measured = texts[WARMUP_DOCS:]
        _apply(worker, store, measured)
        seconds = time.perf_counter() - started
        return {**ingest_costs(worker, texts), "seconds_per_document": seconds / len(measured)}
    finally:
        worker.shutdown()


# (b) and (c): through HTTP.


def service_env(settings: Settings) -> dict[str, str]:
    """`settings` as the `UPTAKE_*` variables of the launched processes, with the Redis they
    share resolved here (an embedded one under the store is started in this process)."""
    return settings.model_copy(update={"redis_url": redis_url(settings)}).child_env()


def bare_answer_rate(settings: Settings, questions: list[str]) -> float:
    """Sequential single-question generate calls in-process: the baseline for (b)."""
    model, tokenizer = load_base(
        settings.model, settings.device, settings.torch_dtype(serving=True)
    )
    generate_answers(model, tokenizer, questions[:2], max_new_tokens=12)
    started = time.perf_counter()
    for q in questions:
        generate_answers(model, tokenizer, [q], max_new_tokens=12)
    return len(questions) / (time.perf_counter() - started)


def http_answering(
    http: httpx.Client, questions: list[str], clients: int, namespaces: Sequence[str] = ("default",)
) -> dict[str, float]:
    """Answers per second and latency quantiles; question i goes to namespace i mod n, so with
    several namespaces each batch mixes adapters."""

    versions: dict[str, int] = {}

    def ask(i: int) -> float:
        namespace = namespaces[i % len(namespaces)]
        body = {"question": questions[i], "namespace": namespace, "max_new_tokens": 12}
        started = time.perf_counter()
        r = http.post("/v1/answer", json=body)
        r.raise_for_status()
        versions[namespace] = r.json()["adapter_version"]
        return time.perf_counter() - started

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(ask, range(min(clients, len(questions)))))  # warm the connections
        started = time.perf_counter()
        latencies = list(pool.map(ask, range(len(questions))))
        seconds = time.perf_counter() - started
    return {
        "clients": clients,
        "namespaces": len(namespaces),
        "versions": versions,  # what each namespace answered from: adapters, or 0 (the base)
        "answers_per_second": len(questions) / seconds,
        "p50_seconds": statistics.median(latencies),
        "p99_seconds": _quantile(latencies, 0.99),
    }


FRESHNESS_STAGES = {
    "queued_and_learning": "POST to learned: the queue, then the update",
    "snapshot_and_publish": "learned to published: the snapshot period, the write, the publish",
    "serving_switch": "published to answering: the API sees the version and loads it",
    "answering": "the answer itself",
}


def freshness(http: httpx.Client, docs: list[Document], rate: float) -> dict:
    """POST one document every 1/rate seconds; each is timed until an answer comes from a
    version that holds it, and split into FRESHNESS_STAGES by its record's timestamps."""

    def follow(doc: Document) -> tuple[float, dict[str, float]]:
        started, posted_at = time.perf_counter(), time.time()
        posted = http.post("/v1/documents", json={"text": doc.text, "namespace": NAMESPACE})
        posted.raise_for_status()
        doc_id = posted.json()["id"]
        answer = http.post(
            "/v1/answer",
            json={
                "question": doc.questions[0].question,
                "namespace": NAMESPACE,
                "wait_for": [doc_id],
                "timeout_s": 600,
            },
        )
        answer.raise_for_status()
        total, done_at = time.perf_counter() - started, time.time()
        record = http.get(f"/v1/documents/{doc_id}").json()
        answering = answer.json()["latency_ms"] / 1000
        marks = [posted_at, record["learned"], record["updated"], done_at - answering, done_at]
        spans = itertools.pairwise(marks)
        return total, {name: end - start for name, (start, end) in zip(FRESHNESS_STAGES, spans)}

    with ThreadPoolExecutor(len(docs)) as pool:
        futures = []
        for doc in docs:
            futures.append(pool.submit(follow, doc))
            time.sleep(1 / rate)
        results = [f.result() for f in futures]
    latencies = [total for total, _ in results]
    status = http.get("/v1/status", params={"namespace": NAMESPACE}).json()
    return {
        "documents_applied": status["documents_applied"],
        "ingest_rate_docs_per_second": rate,
        "documents": len(docs),
        "p50_seconds": statistics.median(latencies),
        "p95_seconds": _quantile(latencies, 0.95),
        "stages_p50_seconds": {
            name: statistics.median(stages[name] for _, stages in results)
            for name in FRESHNESS_STAGES
        },
    }


def streaming(http: httpx.Client, questions: list[str]) -> dict[str, float]:
    """Each question asked twice through /v1/chat/completions, one at a time: streamed (seconds
    to the first piece of text, and to the end) and whole (for the same reply)."""
    firsts, wholes, same = [], [], 0
    for question in questions:
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": 32}
        started = time.perf_counter()
        first, pieces = None, []
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                data = line.removeprefix("data: ")
                if not line.startswith("data: ") or data == "[DONE]":
                    continue
                choices = json.loads(data)["choices"]
                if choices and choices[0]["delta"].get("content"):
                    first = first or time.perf_counter() - started
                    pieces.append(choices[0]["delta"]["content"])
        wholes.append(time.perf_counter() - started)
        firsts.append(first or wholes[-1])
        reply = http.post("/v1/chat/completions", json=body).json()
        same += "".join(pieces) == reply["choices"][0]["message"]["content"]
    return {
        "questions": len(questions),
        "first_piece_p50_seconds": statistics.median(firsts),
        "whole_p50_seconds": statistics.median(wholes),
        "whole_over_first": statistics.median(wholes) / statistics.median(firsts),
        "joined_equals_unstreamed": same / len(questions),
    }


# The whole run.


def _per_mode(
    settings: Settings,
    tmp: Path,
    docs: list[Document],
    texts: list[str],
    cfg: BenchConfig,
    mac_dir: Path | None,
    report: dict,
    log: Callable[[str], None],
) -> None:
    """(d) mac's ingest cost, when MAC networks are given, and (c) each mode's freshness on a
    fresh lineage under `tmp`, into `report`."""
    modes: dict[str, dict] = {"lora": {}}
    if mac_dir is not None:
        modes["mac"] = {"mode": "mac", "mac_dir": mac_dir}
        log(f"(d) mac ingest on the same {cfg.docs} documents")
        report["ingest"]["mac"] = worker_ingest(
            settings.model_copy(
                update={
                    "redis_prefix": f"{settings.redis_prefix}-ingest-mac",
                    "store_dir": tmp / "store-ingest-mac",
                    **modes["mac"],
                }
            ),
            texts,
        )
    else:
        report["modes_not_measured"] = {
            "mac": "not measured: pass --mac DIR (trained MAC networks, from "
            "`uptake meta-train mac`)"
        }
    for mode, update in modes.items():
        fresh_settings = settings.model_copy(  # a new lineage: nothing applied yet
            update={
                "redis_prefix": f"{settings.redis_prefix}-fresh-{mode}",
                "store_dir": tmp / f"store-fresh-{mode}",
                "snapshot_seconds": FRESHNESS_SNAPSHOT_SECONDS,
                **update,
            }
        )
        with live_service(
            service_env(fresh_settings), fresh_settings.store_dir / "logs", True
        ) as http:
            log(
                f"(c) {mode} freshness at {cfg.ingest_rate:g} documents/s "
                f"({cfg.freshness_docs} docs)"
            )
            fresh = freshness(http, docs[: cfg.freshness_docs], cfg.ingest_rate)
        update_seconds = report["ingest"][mode]["seconds_per_document"]
        fresh["snapshot_seconds"] = FRESHNESS_SNAPSHOT_SECONDS
        fresh["target_seconds"] = FRESHNESS_SNAPSHOT_SECONDS + update_seconds
        report["freshness"][mode] = fresh


def run_bench(
    model: str,
    out: Path,
    cfg: BenchConfig,
    base_settings: Settings | None = None,
    command: str = "uptake bench",
    log: Callable[[str], None] = print,
    mac_dir: Path | None = None,
) -> dict:
    """`mac_dir`: trained MAC networks for this base, to measure mode mac's freshness too."""
    out.mkdir(parents=True, exist_ok=True)
    docs = stream_documents(max(cfg.docs, cfg.freshness_docs))
    texts = [d.text for d in docs[: cfg.docs + WARMUP_DOCS]]
    questions = [q.question for d in docs for q in d.questions][: cfg.questions]
    with tempfile.TemporaryDirectory(prefix="uptake-bench-") as tmp:
        settings = (base_settings or Settings()).model_copy(
            update={
                "model": model,
                "store_dir": Path(tmp) / "store",
                "redis_prefix": f"uptake-bench-{uuid.uuid4().hex[:8]}",
                "auth": False,
            }
        )
        log(f"(a) bare update loop and worker through Redis, on the same {cfg.docs} documents")
        bare, worker_dps, worker = worker_vs_bare(settings, texts)
        costs = ingest_costs(worker, texts)
        others = mixed_namespaces(cfg.namespaces)[1:]
        if others:
            log(f"(b) adapters for {len(others)} more namespaces, to mix in one batch")
        for namespace in others:
            _apply(worker, worker.docs, texts[:WARMUP_DOCS], namespace)
        client = worker.redis
        worker.shutdown()
        log(f"(b) bare generate: {len(questions)} sequential questions")
        bare_answers = bare_answer_rate(settings, questions)
        report: dict = {
            "model": model,
            "device": str(settings.device or ("cuda" if torch.cuda.is_available() else "cpu")),
            "torch_threads": torch.get_num_threads(),
            "dtype": _dtype_name(settings),
            "serving_dtype": _dtype_name(settings, serving=True),
            "config": asdict(cfg),
            "settings": {
                k: getattr(settings, k)
                for k in (
                    "strategy",
                    "lr",
                    "steps_per_doc",
                    "snapshot_every",
                    "answer_batch",
                    "learn_batch",
                    "async_snapshots",
                    "dtype",
                )
            },
            "worker_docs_per_second": worker_dps,
            "bare_docs_per_second": bare,
            "worker_vs_bare_ratio": worker_dps / bare,
            "bare_sequential_answers_per_second": bare_answers,
            "answering": [],
            "ingest": {"lora": {**costs, "seconds_per_document": 1 / worker_dps}},
            "freshness": {},
        }
        with live_service(service_env(settings), settings.store_dir / "logs", False) as http:
            runs = [(clients, ["default"]) for clients in cfg.concurrency]
            if cfg.namespaces > 1:
                runs.append((max(cfg.concurrency), mixed_namespaces(cfg.namespaces)))
            for clients, namespaces in runs:
                row = http_answering(http, questions, clients, namespaces)
                log(f"(b) HTTP answering: {_clients(row)}")
                row["vs_bare_sequential"] = row["answers_per_second"] / bare_answers
                report["answering"].append(row)
            log("(e) streamed chat: first piece against the whole reply")
            report["streaming"] = streaming(http, questions[: cfg.streamed])
        _per_mode(settings, Path(tmp), docs, texts, cfg, mac_dir, report, log)
        stale = list(client.scan_iter(f"{settings.redis_prefix}*", count=500))
        if stale:
            client.delete(*stale)
        client.close()
    report["command"] = command
    write_bench(report, out)
    return report


def _dtype_name(settings: Settings, serving: bool = False) -> str:
    return str(base_dtype(settings.device, settings.torch_dtype(serving))).removeprefix("torch.")


def _worker_settings(settings: dict) -> str:
    batch = settings.get("learn_batch", 1)
    per_step = f"up to {batch} queued documents" if batch > 1 else "one document"
    learns = f"the worker learns {per_step} per step"
    where = "in the background" if settings.get("async_snapshots") else "in its loop"
    return f"{learns} and writes snapshots {where}"


def _yes(met: bool) -> str:
    return "**yes**" if met else "no"


def _clients(row: dict) -> str:
    n = row.get("namespaces", 1)
    clients = f"{row['clients']} client" + ("s" if row["clients"] > 1 else "")
    return clients + (f" over {n} namespaces" if n > 1 else "")


def bench_markdown(report: dict) -> str:
    lines = [
        "# uptake bench",
        "",
        f"Reproduce: `{report['command']}`",
        "",
        f"Model `{report['model']}` on {report['device']} with {report['torch_threads']} torch "
        f"threads, the base in {report.get('dtype', 'float32')} for learning and in "
        f"{report.get('serving_dtype', report.get('dtype', 'float32'))} for answers; "
        f"{_worker_settings(report.get('settings', {}))}.",
        "",
        "| pair | service | baseline | ratio |",
        "| --- | --- | --- | --- |",
        f"| (a) documents/s: worker via Redis vs bare update loop | "
        f"{report['worker_docs_per_second']:.2f} | {report['bare_docs_per_second']:.2f} | "
        f"**{report['worker_vs_bare_ratio']:.2f}** |",
    ]
    for row in report["answering"]:
        lines.append(
            f"| (b) answers/s: HTTP, {_clients(row)} vs sequential bare generate | "
            f"{row['answers_per_second']:.1f} | {report['bare_sequential_answers_per_second']:.1f}"
            f" | **{row['vs_bare_sequential']:.2f}** |"
        )
    lines += [
        "",
        "| clients | answers/s | × 1 client | p50 s | p99 s | p99 / p50 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    single = report["answering"][0]["answers_per_second"]
    for row in report["answering"]:
        lines.append(
            f"| {_clients(row)} | {row['answers_per_second']:.1f} | "
            f"{row['answers_per_second'] / single:.2f} | {row['p50_seconds']:.3f} | "
            f"{row['p99_seconds']:.3f} | {row['p99_seconds'] / row['p50_seconds']:.2f} |"
        )
    lines += [
        "",
        "| mode | freshness p50 s | p95 s | at documents/s | snapshot period s "
        "| target: period + one update, s | p95 within it |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, f in report["freshness"].items():
        target = f.get("target_seconds")
        lines.append(
            f"| {mode} | {f['p50_seconds']:.2f} | {f['p95_seconds']:.2f} | "
            f"{f['ingest_rate_docs_per_second']:g} | {f.get('snapshot_seconds', '')} | "
            + ("| |" if target is None else f"{target:.2f} | {_yes(f['p95_seconds'] <= target)} |")
        )
    for mode, f in report["freshness"].items():
        if "stages_p50_seconds" in f:
            lines += ["", f"Where {mode}'s freshness goes (p50 of each stage, seconds):", ""]
            lines += ["| stage | p50 s |", "| --- | --- |"]
            for name, seconds in f["stages_p50_seconds"].items():
                lines.append(f"| {FRESHNESS_STAGES[name]} | {seconds:.2f} |")
    lines += [
        "",
        "| mode | s / document at ingest | snapshot bytes / document | Redis bytes / document |",
        "| --- | --- | --- | --- |",
    ]
    for mode, c in report["ingest"].items():
        lines.append(
            f"| {mode} | {c['seconds_per_document']:.3f} | "
            f"{c['snapshot_bytes_per_document']:,.0f} | {c['redis_bytes_per_document']:,.0f} |"
        )
    if "mac" in report["ingest"]:
        speedup = (
            report["ingest"]["lora"]["seconds_per_document"]
            / report["ingest"]["mac"]["seconds_per_document"]
        )
        lines.append(f"\nmac ingests a document **{speedup:.1f}×** as fast as a lora update.")
    if "streaming" in report:
        st = report["streaming"]
        lines.append(
            f"\n(e) streamed chat, {st['questions']} questions one at a time: the first piece of "
            f"text after {st['first_piece_p50_seconds']:.3f} s (p50), the whole reply after "
            f"{st['whole_p50_seconds']:.3f} s: **{st['whole_over_first']:.1f}×** sooner; the "
            f"pieces joined equal the unstreamed reply for {st['joined_equals_unstreamed']:.0%}."
        )
    for mode, why in report.get("modes_not_measured", {}).items():
        lines.append(f"\nNot measured: `{mode}`: {why}.")
    return "\n".join(lines) + "\n"


def plot_bench(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(
        ["bare loop", "worker"],
        [report["bare_docs_per_second"], report["worker_docs_per_second"]],
        color=["grey", "tab:blue"],
    )
    left.set_ylabel("documents / s")
    left.set_title(f"(a) worker vs bare: {report['worker_vs_bare_ratio']:.2f}")
    rows = [r for r in report["answering"] if r.get("namespaces", 1) == 1]
    right.plot([r["clients"] for r in rows], [r["answers_per_second"] for r in rows], "o-")
    right.axhline(report["bare_sequential_answers_per_second"], color="grey", ls="--")
    right.set_xscale("log", base=2)
    right.set_xlabel("concurrent HTTP clients")
    right.set_ylabel("answers / s")
    right.set_title("(b) answering (dashed: sequential bare generate)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_bench(report: dict, out: Path) -> None:
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    (out / "bench.md").write_text(bench_markdown(report))
    plot_bench(report, out / "bench.png")
