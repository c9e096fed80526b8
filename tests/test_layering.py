"""The product and the lab stay apart: the service's request and ingest path loads no lab code,
and the lab reaches the service only as processes over HTTP."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "adaptation" / "lab"


def test_the_service_path_loads_no_lab_module() -> None:
    probe = (
        "import sys\n"
        "import service.api, service.engine, service.worker\n"
        "print('\\n'.join(m for m in sys.modules if m.split('.')[:2] == ['adaptation', 'lab']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = done.stdout.split()
    assert not loaded, f"service.api, service.worker or service.engine load lab code: {loaded}"


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_the_lab_imports_nothing_from_the_service() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            n for n in _imported(path) if n == "service" or n.startswith("service.")
        )
        for path in sorted(LAB.rglob("*.py"))
    }
    offenders = {path: names for path, names in offenders.items() if names}
    assert not offenders, f"lab modules import the service: {offenders}"
