"""The package graph, read from the source (an ast walk over every import, lazy ones inside
functions included): `records` imports no package of this project; `analysis` reads what runs and
sweeps wrote through `records`, never through `train` or `sweep`; `train` knows nothing of the
sweep, Hydra or SLURM; and no two packages import each other, directly or around a cycle."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.harness import REPO

PACKAGES = ("records", "sweep", "train", "analysis", "slurm", "hydra_plugins")


def imports(package: str) -> dict[str, set[str]]:
    """Per module of `package`: the top-level names of everything it imports, anywhere in it."""
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(REPO))] = names
    return out


def edges() -> dict[str, set[str]]:
    """Package -> the other packages of this project it imports."""
    return {
        p: {name for names in imports(p).values() for name in names if name in PACKAGES and name != p}
        for p in PACKAGES
    }


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("records", set(PACKAGES) - {"records"}),
        ("analysis", {"train", "sweep", "slurm", "hydra_plugins", "torch"}),
        ("train", {"sweep", "analysis", "slurm", "hydra_plugins", "hydra", "submitit"}),
    ],
)
def test_a_package_imports_nothing_it_must_not(package, forbidden):
    found = {module: names & forbidden for module, names in imports(package).items() if names & forbidden}
    assert found == {}


def test_the_package_graph_has_no_cycle():
    graph = edges()
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph[node]):
            assert seen.get(nxt) != 1, f"import cycle: {' -> '.join([*path, nxt])}"
            if nxt not in seen:
                visit(nxt, [*path, nxt])
        seen[node] = 2

    for package in PACKAGES:
        if package not in seen:
            visit(package, [package])
    assert "records" in graph["analysis"] and "records" in graph["train"]  # the walk sees real edges


def test_the_login_node_commands_start_without_torch():
    """`python -m sweep`, its status tools and the analysis import no torch to start (a login node
    starts them often; torch takes seconds to import): checked by importing them for real."""
    modules = ["sweep.__main__", "sweep.status", "sweep.resubmit", "sweep.cancel", "analysis.__main__"]
    code = "import sys; " + "; ".join(f"import {m}" for m in modules) + "; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
