"""`python -m sweep.status <sweep dir | experiment name> [--watch S] [--wide] [--tail JOB] [--verdicts]`:
one table of every job of a sweep.

States (pending, running, completed, stopped, failed, diverged, timeout, lost) come from each run's
own `status.json` and claim, together with one batched `squeue` call (and `sacct` for jobs that
left the queue, where accounting exists): a job SLURM calls COMPLETED whose Python raised is
`failed`; a run stopped by a signal after a checkpoint is `stopped` (resumable). Exit code 1 if any
job failed, diverged, timed out or was lost.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from records.manifest import read_manifest
from records.run_status import BAD, IN_FLIGHT, RunState, read_status
from sweep.job_states import latest_job_id, squeue_states, sweep_states
from sweep.manifest import sweep_dir_of, sweep_parser
from sweep.plan import format_table, tokens_text

# `val loss`: the last evaluation, on the validation sequences every arm shares (one step's training
# loss is one batch's: at batch 1 its noise hides a gap of a tenth of a nat).
COLUMNS = ["job", "state", "id", "done", "val loss", "tok/s", "eta", "note"]
WIDE = ["replicate", "requeues", "wandb"]
WIDTH = 100  # the default table fits a terminal this wide: the note is cut to what is left


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _eta(status: dict[str, Any], budget: int | None) -> float | None:
    """Seconds left at the run's average rate since this attempt started (not a 10-second window,
    which swings with evaluations and checkpoints)."""
    tokens, start = status.get("tokens"), status.get("start_tokens", 0)
    elapsed = float(status.get("heartbeat", 0)) - float(status.get("started", 0))
    if not budget or tokens is None or elapsed <= 0 or tokens <= start:
        return None
    return (budget - tokens) / ((tokens - start) / elapsed)


def _wandb(run_dir: Path, status: dict[str, Any]) -> str:
    """The W&B run: entity/project/id online, the offline run's directory name offline."""
    if status.get("wandb_path"):
        return str(status["wandb_path"])
    offline = sorted(run_dir.glob("wandb/offline-run-*"))
    return offline[-1].name if offline else ""


def _branch_note(manifest: dict[str, Any], job: dict[str, Any]) -> str:
    """Where an arm started from weights other than its warmup's current run (the warmup was redone
    with another config since): its pairs with arms of the new warmup are not compared."""
    branch = str(job.get("derived", {}).get("branch", ""))
    warmups = [manifest["jobs"][d] for d in job.get("depends_on", []) if d in manifest["jobs"]]
    warmups = [w for w in warmups if w.get("kind") == "warmup"]
    if branch.startswith("warmup:") and warmups and branch != f"warmup:{warmups[0]['signature']}":
        return f"started from an older warmup ({branch}): not comparable with arms of the current one"
    return ""


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    manifest = read_manifest(sweep_dir)
    states = sweep_states(manifest, squeue_states())
    rows = []
    for name, job in manifest["jobs"].items():
        state = states[name]
        status = state.status or {}
        budget = status.get("token_budget", job.get("derived", {}).get("token_budget"))
        tokens = status.get("tokens")
        job_id = latest_job_id(job) or ""
        local_pid = status.get("pid") if not (status.get("launch") or {}).get("job_id") else None
        running = state.state == RunState.RUNNING
        rows.append(
            {
                "job": name,
                "state": state.state,
                "id": f"pid {local_pid}" if running and local_pid else job_id,
                "done": f"{tokens_text(tokens)}/{tokens_text(budget)}"
                if tokens is not None and budget
                else "",
                "val loss": f"{status['val_loss']:.4f}" if status.get("val_loss") is not None else "",
                "tok/s": f"{status['tokens_per_s']:.0f}" if status.get("tokens_per_s") else "",
                "eta": _duration(_eta(status, budget)) if running else "",
                "note": "; ".join(
                    n for n in (state.reason, _branch_note(manifest, job), _decided_note(job, status)) if n
                ),
                "replicate": job.get("derived", {}).get("replicate", ""),
                "requeues": (status.get("launch") or {}).get("restarts", ""),
                "wandb": _wandb(Path(job["run_dir"]), status) if job["kind"] != "prepare" else "",
                "_eta_s": _eta(status, budget) if running else None,
            }
        )
    return rows


def _decided_note(job: dict[str, Any], status: dict[str, Any]) -> str:
    """For an arm that stopped once decided: the decisions of the pairs it belongs to."""
    if status.get("state") != RunState.DECIDED:
        return ""
    base = job.get("derived", {}).get("base") or ""
    pairs = ((status.get("decision") or {}).get("pairs")) or {}
    return "; ".join(
        f"{pair} {d['verdict']}, look {d['look']}" for pair, d in pairs.items() if base in pair.split("-")
    )


def render(rows: list[dict[str, Any]], wide: bool) -> str:
    """The table: `WIDTH` columns with the note cut to fit, or every column in full (`wide`)."""
    columns = COLUMNS + WIDE if wide else COLUMNS
    if not wide:
        fixed = format_table([{**r, "note": ""} for r in rows], columns).splitlines()[0]
        room = max(WIDTH - len(fixed.rstrip()) - 1, 12)
        rows = [
            {**r, "note": r["note"] if len(r["note"]) <= room else r["note"][: room - 1] + "…"} for r in rows
        ]
    return format_table(rows, columns)


def summary(rows: list[dict[str, Any]]) -> str:
    """One line: how many jobs are in each state, and when the running ones end at their pace."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[str(r["state"])] = counts.get(str(r["state"]), 0) + 1
    parts = [f"{n} {state}" for state, n in counts.items()]
    etas = [r["_eta_s"] for r in rows if r["_eta_s"] is not None]
    ends = f"; the running jobs end in about {_duration(max(etas))}" if etas else ""
    return f"{len(rows)} jobs: {', '.join(parts)}{ends}"


def tail(sweep_dir: Path, job: str, lines: int) -> str:
    """The end of a job's log (stderr, where progress and errors go), from the newest attempt."""
    manifest = read_manifest(sweep_dir)
    if job not in manifest["jobs"]:
        raise LookupError(f"no job {job!r} in {sweep_dir} (jobs: {', '.join(manifest['jobs'])})")
    job_id = latest_job_id(manifest["jobs"][job])
    logs = sorted((sweep_dir / "jobs").glob(f"{job_id}_*log.err")) if job_id else []
    if not logs:
        raise LookupError(f"job {job} has no log yet (its job id: {job_id or 'none, never started'})")
    text = logs[0].read_text(errors="replace").splitlines()
    return f"==> {logs[0]} <==\n" + "\n".join(text[-lines:])


def _verdicts(sweep_dir: Path, skip_tokens: int | None) -> str:
    """The declared pairs' verdicts now, from what the arms logged so far (defaults of the analysis)."""
    from analysis.options import BinSpec
    from analysis.report import Comparison, live_verdicts, verdict_table

    cmp = Comparison([], BinSpec(skip_tokens=skip_tokens or 0), experiment_skip=skip_tokens is None)
    pairs = live_verdicts(sweep_dir, cmp)
    if pairs.empty:
        return "\nverdicts: no pair has rows in both arms yet"
    return "\nverdicts so far (python -m analysis for the tables, plots and options):\n" + verdict_table(
        pairs
    )


def decisions(sweep_dir: Path) -> str:
    """With experiment.stop_when_decided: each pair's decision as the arms recorded it, the budget
    each arm spent, and what stopping saved (GPU-hours from the FLOP count); "" otherwise."""
    from sweep.plan import gpu_hours
    from sweep.schema import ResourcesConfig

    manifest = read_manifest(sweep_dir)
    decide = manifest.get("decide") or {}
    if not decide:
        return ""
    res = ResourcesConfig(**manifest["resources"])
    pairs: dict[str, dict[str, Any]] = {}
    spent, saved, total = [], 0.0, 0.0
    for name, job in manifest["jobs"].items():
        if job["kind"] != "arm":
            continue
        status = read_status(job["run_dir"]) or {}
        variant = job["derived"].get("variant") or ""
        for pair, d in ((status.get("decision") or {}).get("pairs") or {}).items():
            pairs[f"{pair}[{variant}]" if variant else pair] = d
        budget, flops = int(job["derived"]["token_budget"]), float(job["derived"]["flops"])
        total += gpu_hours(flops, res)
        if status.get("state") == RunState.DECIDED:
            share = int(status.get("tokens") or 0) / budget
            saved += gpu_hours(flops * (1 - share), res)
            spent.append(f"{name} at {share:.0%}")
    lines = [f"\ndecisions (experiment.stop_when_decided, {decide['looks']} looks):"]
    for pair, d in sorted(pairs.items()):
        lines.append(
            f"  {pair}: {d['verdict']} at look {d['look']} ({tokens_text(d['tokens'])} tokens), "
            f"mean gap {d['mean_gap']:+.3g} [{d['ci_low']:+.3g}, {d['ci_high']:+.3g}], δ {d['delta']:.3g}"
        )
    if not pairs:
        lines.append("  no pair decided yet")
    stopped = f" ({', '.join(spent)} of its budget)" if spent else ""
    fraction = f" ({saved / total:.0%})" if total else ""
    lines.append(f"  stopping saved {saved:.3g} of {total:.3g} GPU-hours{fraction}{stopped}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_docs.py parses every documented use with it)."""
    cli = sweep_parser("python -m sweep.status", __doc__)
    cli.add_argument("--watch", type=float, metavar="S", help="refresh every S seconds until all jobs end")
    cli.add_argument("--wide", action="store_true", help="every column in full (replicate, requeues, W&B)")
    cli.add_argument("--tail", metavar="JOB", help="print the end of JOB's log instead of the table")
    cli.add_argument("--lines", type=int, default=30, help="with --tail: how many lines (default 30)")
    cli.add_argument(
        "--verdicts",
        action="store_true",
        help="also each declared pair's verdict from the rows logged so far (python -m analysis's method)",
    )
    cli.add_argument(
        "--skip-tokens",
        type=int,
        default=None,
        metavar="N",
        help="with --verdicts: leave out the first N tokens (default: the experiment's branch transient)",
    )
    return cli


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    sweep_dir = sweep_dir_of(args)
    while True:
        try:
            if args.tail:
                print(tail(sweep_dir, args.tail, args.lines))
                return 0
            rows = sweep_rows(sweep_dir)
        except (FileNotFoundError, LookupError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if args.watch:
            print("\033[2J\033[H" + time.strftime("%H:%M:%S ") + str(sweep_dir))
        print(render(rows, args.wide), flush=True)
        print(summary(rows), flush=True)
        if text := decisions(sweep_dir):
            print(text, flush=True)
        if args.verdicts:
            print(_verdicts(sweep_dir, args.skip_tokens), flush=True)
        if not args.watch or all(r["state"] not in IN_FLIGHT for r in rows):
            break
        time.sleep(args.watch)
    return 1 if any(r["state"] in BAD for r in rows) else 0


def run() -> None:
    """The `bss-status` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
