"""The container and Kubernetes files agree with each other and with the `uptake` CLI."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from service.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DEPLOY = ROOT / "deploy"
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore")
YAML_FILES = sorted(p for d in (DOCKER, DEPLOY) for p in d.rglob("*.y*ml"))


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomization() -> dict[str, Any]:
    return load_yaml(DEPLOY / "kustomization.yaml")[0]


def manifests() -> list[dict[str, Any]]:
    return [doc for res in kustomization()["resources"] for doc in load_yaml(DEPLOY / res)]


def find(kind: str | tuple[str, ...], name: str) -> dict[str, Any]:
    kinds = (kind,) if isinstance(kind, str) else kind
    hits = [m for m in manifests() if m["kind"] in kinds and m["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {'/'.join(kinds)} named {name}, found {len(hits)}"
    return hits[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def uptake_containers() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for m in manifests():
        if m["kind"] in ("Deployment", "StatefulSet"):
            for c in pod_spec(m)["containers"]:
                if c["image"].split(":")[0].endswith("uptake"):
                    out.append((f"{m['kind']}/{m['metadata']['name']}", c))
    return out


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    lines = [ln.strip() for ln in joined.splitlines()]
    return [
        (ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "")
        for ln in lines
        if ln and not ln.startswith("#")
    ]


def compose() -> dict[str, Any]:
    return load_yaml(DOCKER / "compose.yaml")[0]


def expand_default(value: str) -> str:
    """Compose's ${VAR:-default} with VAR unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def uptake_commands() -> list[tuple[str, list[str]]]:
    """Every command line that runs our image, wherever it is written."""
    found = []
    for path in DOCKERFILES:
        for instr, args in dockerfile(path):
            if instr in ("CMD", "ENTRYPOINT"):
                found.append((f"{path.name} {instr}", json.loads(args)))
    for name, svc in compose()["services"].items():
        if "build" in svc:
            assert "command" in svc, f"compose service {name} runs our image without a command"
            found.append((f"compose {name}", argv(svc["command"])))
    for where, c in uptake_containers():
        assert "command" in c, f"{where} container {c['name']} has no command"
        found.append((f"{where} {c['name']}", argv(c["command"]) + argv(c.get("args", []))))
    return found


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_yaml_parses() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in YAML_FILES}
    assert {"docker/compose.yaml", "deploy/kustomization.yaml"} <= names
    for path in YAML_FILES:
        docs = load_yaml(path)
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_kustomization_lists_existing_resources_only() -> None:
    listed = kustomization()["resources"]
    assert listed, "kustomization.yaml lists no resources"
    for res in listed:
        assert (DEPLOY / res).is_file(), f"kustomization resource {res} does not exist"
    unlisted = {p.name for p in DEPLOY.glob("*.yaml")} - set(listed) - {"kustomization.yaml"}
    assert not unlisted, f"manifests not in kustomization.yaml: {sorted(unlisted)}"


def test_every_command_is_a_real_uptake_subcommand() -> None:
    parser = build_parser()
    known = set(subcommands(parser))
    commands = uptake_commands()
    assert len(commands) >= 6  # two Dockerfiles, compose api+worker, k8s api+worker
    used = set()
    for where, args in commands:
        assert args[0] == "uptake", f"{where}: {args} does not run the uptake CLI"
        assert len(args) > 1 and args[1] in known, (
            f"{where}: `{' '.join(args)}` names no uptake subcommand; known: {sorted(known)}"
        )
        used.add(args[1])
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                parser.parse_args(args[1:])
            except SystemExit:
                pytest.fail(f"{where}: `uptake` rejects {args[1:]}: {err.getvalue().strip()}")
    assert {"serve", "worker"} <= used


def test_api_probes_point_at_health_endpoints() -> None:
    api = find("Deployment", "uptake-api")
    (container,) = pod_spec(api)["containers"]
    port_names = {p.get("name") for p in container["ports"]} | {
        p["containerPort"] for p in container["ports"]
    }
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        if probe in container:
            assert container[probe]["httpGet"]["port"] in port_names, probe
    serve = argv(container["command"])
    assert str(container["ports"][0]["containerPort"]) == serve[serve.index("--port") + 1]


def test_services_autoscaler_and_store_fit_together() -> None:
    api = find("Deployment", "uptake-api")
    service = find("Service", "uptake-api")
    api_labels = api["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= api_labels.items()
    target = find("HorizontalPodAutoscaler", "uptake-api")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "uptake-api")

    redis = find(("StatefulSet", "Deployment"), "redis")
    redis_svc = find("Service", "redis")
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    assert redis_svc["spec"]["selector"].items() <= redis_labels.items()
    assert redis_svc["spec"]["ports"][0]["port"] == 6379

    pvc = find("PersistentVolumeClaim", "uptake-store")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in ("uptake-api", "uptake-worker"):
        claims = {
            v["persistentVolumeClaim"]["claimName"]
            for v in pod_spec(find("Deployment", name)).get("volumes", [])
            if "persistentVolumeClaim" in v
        }
        assert claims == {"uptake-store"}, name


def test_uptake_containers_get_their_settings() -> None:
    (generator,) = [
        g for g in kustomization()["configMapGenerator"] if g["name"] == "uptake-config"
    ]
    env = dict(lit.split("=", 1) for lit in generator["literals"])
    assert {"UPTAKE_REDIS_URL", "UPTAKE_STORE_DIR", "UPTAKE_MODEL"} <= env.keys()
    redis_url = urlparse(env["UPTAKE_REDIS_URL"])
    assert redis_url.scheme == "redis" and redis_url.port == 6379
    find("Service", redis_url.hostname)
    containers = uptake_containers()
    assert {c["name"] for _, c in containers} == {"api", "worker"}
    for where, c in containers:
        refs = {e["configMapRef"]["name"] for e in c.get("envFrom", []) if "configMapRef" in e}
        assert refs == {"uptake-config"}, where
        mounts = [m["mountPath"] for m in c["volumeMounts"]]
        assert any(env["UPTAKE_STORE_DIR"].startswith(m) for m in mounts), where


def test_compose_wires_redis_api_and_worker() -> None:
    services = compose()["services"]
    assert {"redis", "api", "worker"} <= services.keys()
    api, worker = services["api"], services["worker"]
    for name in ("api", "worker"):
        svc = services[name]
        assert "redis" in svc["depends_on"], name
        env = svc["environment"]
        assert {"UPTAKE_REDIS_URL", "UPTAKE_STORE_DIR", "UPTAKE_MODEL"} <= env.keys(), name
        assert urlparse(env["UPTAKE_REDIS_URL"]).hostname == "redis", name
        dockerfile_path = (
            DOCKER / svc["build"]["context"] / expand_default(svc["build"]["dockerfile"])
        )
        assert dockerfile_path.resolve().is_file(), name
    store_dir = api["environment"]["UPTAKE_STORE_DIR"]
    shared = {v for v in api["volumes"] if v.split(":")[1] == store_dir} & set(worker["volumes"])
    assert shared, "api and worker must mount one named volume at UPTAKE_STORE_DIR"
    assert shared.pop().split(":")[0] in compose()["volumes"]
    health = " ".join(argv(api["healthcheck"]["test"]))
    assert "/healthz" in health
    published = api["ports"][0].split(":")[-1]
    serve = argv(api["command"])
    assert f":{published}/healthz" in health and serve[serve.index("--port") + 1] == published


def test_dockerfiles() -> None:
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.cuda"}
    for path in DOCKERFILES:
        steps = dockerfile(path)
        args = {a.split("=", 1)[0]: a.split("=", 1)[-1] for i, a in steps if i == "ARG"}
        base = next(a for i, a in steps if i == "FROM")
        base = args.get(base.strip("${}"), base)
        if path.name == "Dockerfile.cpu":
            assert base == "python:3.11-slim"
        else:
            assert base.startswith("nvidia/cuda:") and "runtime" in base
        assert "TORCH_SPEC" in args
        runs = [a for i, a in steps if i == "RUN"]
        assert any("pip install ${TORCH_SPEC}" in r for r in runs), path.name
        assert any("pip install ." in r for r in runs), path.name
        assert ("USER", "uptake") in steps, f"{path.name} should not run as root"
        exposed = {a for i, a in steps if i == "EXPOSE"}
        (cmd,) = [json.loads(a) for i, a in steps if i == "CMD"]
        assert {cmd[cmd.index("--port") + 1]} == exposed, path.name
