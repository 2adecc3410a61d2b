"""Every command the README and docs/ show works as written: a sweep command dry-runs (or is refused
for the reason the text gives, where it names a placeholder path), an analysis command composes
with its typed options, the status tools parse their flags, a make target exists, a benchmark
module exists. What only a cluster or the network can run (wandb login/sync, the cluster script)
is named here and left out. The metrics reference is the schema's table."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from tests.harness import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
EXTERNAL = (".venv/bin/wandb", "bash ", "eval ", "OMP_NUM_THREADS")  # other tools, the network, a cluster


def shown_commands() -> list[tuple[str, str]]:
    """(doc, command) for every indented code line of the docs, continuations joined, comments and
    usage brackets resolved: `[--a X]` is shown as optional (kept), `[--a | --b]` takes the first
    alternative, `[overrides]` and `...` stand for more (dropped)."""
    out = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.startswith("    ") and not line.strip().startswith(("#", "|")):
                text = line.strip()
                while text.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    text = text[:-1] + " " + lines[i].strip()
                if re.match(r"(python|make|\.venv|bss-|bash|eval|OMP_)", text):
                    text = re.sub(r"\s+#.*$", "", text)
                    text = re.sub(r"\[([^\]|]*?)\s*\|[^\]]*\]", r"\1", text)
                    text = re.sub(r"\[(overrides)\]", "", text)
                    text = re.sub(r"(?<!=)\[(-[^\]]*|\+[^\]]*)\]", r"\1", text)
                    text = text.replace(" ...", "")
                    if text.strip() not in {c for _, c in out}:  # each command once, where first shown
                        out.append((doc.name, text.strip()))
            i += 1
    return out


COMMANDS = shown_commands()


def test_the_docs_show_commands_and_name_the_external_ones():
    kinds = {
        cmd.split()[0] if not cmd.startswith("python") else " ".join(cmd.split()[:3]) for _, cmd in COMMANDS
    }
    assert {"python -m sweep", "python -m analysis", "make demo"} <= kinds | {c for _, c in COMMANDS}
    assert len(COMMANDS) >= 20


def _case(doc_cmd: tuple[str, str]) -> str:
    return f"{doc_cmd[0]}: {doc_cmd[1][:60]}"


@pytest.mark.parametrize("doc_cmd", COMMANDS, ids=[_case(c) for c in COMMANDS])
def test_a_shown_command_works_as_written(doc_cmd, tmp_path):
    _, cmd = doc_cmd
    argv = shlex.split(cmd)
    if cmd.startswith(EXTERNAL):
        pytest.skip("another tool, the network or a cluster")
    if argv[0] == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M)
        assert argv[1] in targets
        return
    assert argv[:2] == ["python", "-m"], cmd
    module, args = argv[2], argv[3:]
    if module.startswith("benchmarks."):
        assert (REPO / "benchmarks" / f"{module.split('.', 1)[1]}.py").exists()
        return
    if module in ("sweep.status", "sweep.resubmit", "sweep.cancel"):
        import importlib

        importlib.import_module(module).parser().parse_args(args)
        return
    if module == "sweep":
        args = [*args, "sweep.dry_run=true", f"sweep.root={tmp_path}"]
    elif module == "analysis":
        args = [*args, "--cfg", "job"]
    run = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    text = run.stdout + run.stderr
    if "/shared/" in cmd:  # a placeholder path on a cluster's storage: refused, by name
        assert run.returncode != 0 and "no file matches" in text, text[-2000:]
    else:
        assert run.returncode == 0, text[-3000:]
        assert "Traceback" not in text


def test_the_metrics_reference_is_the_schemas_table():
    from records.metrics import markdown_table

    assert markdown_table() in (REPO / "docs" / "metrics.md").read_text()


def _declared_in_docs(experiment: str) -> tuple[list[list[str]], list[list[str]]]:
    """(yardstick, controls) as docs/studies.md's section of `experiment` states them."""
    text = (REPO / "docs" / "studies.md").read_text()
    section = text.split(f"### `{experiment}`", 1)[1].split("\n### ", 1)[0]

    def pairs(label: str) -> list[list[str]]:
        found = re.search(rf"\*\*{label}:\*\* ([^.(]*)", section)
        named = found.group(1).strip() if found else "none"
        return [] if named.startswith("none") else [p.strip().split("↔") for p in named.split(",")]

    return pairs("Yardstick"), pairs("Controls")


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
def test_each_presets_yardstick_is_what_its_section_says(experiment):
    from tests.harness import compose

    exp = compose([f"+experiment={experiment}"]).experiment
    assert _declared_in_docs(experiment) == (
        [list(p) for p in exp.yardstick],
        [list(p) for p in exp.controls],
    )
