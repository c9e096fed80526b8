"""The CI regression check: a short `uptake bench --quick` that fails if the worker's overhead over
a bare update loop grows (worker_vs_bare_ratio below 0.45). On the tiny model fixed costs
dominate, and the same code read 0.52 to 0.74 on one machine, so the floor only catches a worker
about twice as slow as the bare loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.bench import FRESHNESS_STAGES
from service.cli import main
from tests.servicekit import redis_for_tests


def test_quick_bench_writes_its_report_and_holds_the_worker_ratio(
    tmp_path: Path, tiny_model_dir: Path, tiny_mac_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "bench"
    with redis_for_tests(tmp_path) as url:
        monkeypatch.setenv("UPTAKE_REDIS_URL", url)
        monkeypatch.setenv("UPTAKE_TORCH_THREADS", "1")
        rc = main(
            [
                "bench",
                "--quick",
                "--model",
                str(tiny_model_dir),
                "--mac",
                str(tiny_mac_dir),
                "--out",
                str(out),
                "--fail-below",
                "0.45",
            ]
        )
    report = json.loads((out / "bench.json").read_text())
    assert rc == 0, f"worker_vs_bare_ratio {report['worker_vs_bare_ratio']:.2f} < 0.45"
    assert report["worker_vs_bare_ratio"] == pytest.approx(
        report["worker_docs_per_second"] / report["bare_docs_per_second"]
    )
    answering = report["answering"]
    assert [(row["clients"], row["namespaces"]) for row in answering] == [(1, 1), (8, 1), (8, 4)]
    mixed = answering[-1]["versions"]  # every row of the mixed batches had its own adapter
    assert len(mixed) == 4 and all(version >= 1 for version in mixed.values()), mixed
    assert all(row["p99_seconds"] >= row["p50_seconds"] > 0 for row in report["answering"])
    for mode in ("lora", "mac"):
        fresh = report["freshness"][mode]
        assert fresh["documents"] == fresh["documents_applied"] == 6, mode  # none skipped
        update = report["ingest"][mode]["seconds_per_document"]
        assert fresh["target_seconds"] == pytest.approx(fresh["snapshot_seconds"] + update)
        stages = fresh["stages_p50_seconds"]
        assert list(stages) == list(FRESHNESS_STAGES) and min(stages.values()) >= 0, stages
        assert stages["queued_and_learning"] > 0 and stages["answering"] > 0, stages
        assert sum(stages.values()) < 2 * fresh["p95_seconds"], stages
    assert "modes_not_measured" not in report
    streamed = report["streaming"]
    assert streamed["questions"] == 3 and streamed["joined_equals_unstreamed"] == 1.0
    assert streamed["whole_p50_seconds"] >= streamed["first_piece_p50_seconds"] > 0
    assert report["ingest"]["lora"]["documents"] == 16 + 2
    assert f"uptake bench --quick --mac {tiny_mac_dir}" in (out / "bench.md").read_text()
    assert (out / "bench.png").stat().st_size > 0
