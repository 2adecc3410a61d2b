"""The collector and comparison tables on synthetic runs written here (known gaps, known noise),
from run dirs and from the W&B API (the real `wandb.Api` client against `tests/wandb_standin.py`)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.collect import ArmRows, long_table
from analysis.ladders import best_of_ladders
from analysis.options import BinSpec, Margin
from analysis.paired import LoggedSteps, matched_windows
from analysis.report import Comparison, analyze
from analysis.robust import Estimate
from analysis.verdict import verdict
from analysis.wandb_source import WandbSelection, collect_wandb
from records.manifest import read_manifest
from records.metrics import read_metrics
from tests.harness import sim_arm
from tests.wandb_standin import ENTITY, StandinRun, WandbStandin

REPO = Path(__file__).resolve().parent.parent
SEQ = 128
STEPS_LARGE = 400  # large-batch steps; 20 bins of 20 steps each
GAPS = np.array([0.010 + (0.004 if i % 2 else -0.004) for i in range(20)])  # per-bin gap A - H, known


def curve(
    batch: int, offset: np.ndarray, noise: float = 0.0, seed: int = 0, steps: int | None = None
) -> list[dict]:
    """Rows of an arm whose loss is constant within each of the 20 bins: 3 - 0.01 bin + offset[bin]."""
    total = STEPS_LARGE * 16 // batch
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(steps or total):
        tokens = (k + 1) * batch * SEQ
        b = min((k * batch) // (16 * 20), 19)  # the bin of this row: 20 large steps = 320 sequences
        loss = 3.0 - 0.01 * b + offset[b] + (rng.normal(0.0, noise) if noise else 0.0)
        row = {"step": k + 1, "tokens": tokens, "loss": loss, "lr": 1e-3, "tokens_per_s": 1000.0 * batch}
        row |= {"b_simple": 50.0, "gpu_hours": 0.001 * (k + 1) / total}
        if tokens % (16 * SEQ * 40) == 0:
            row["val_loss"] = loss + 0.05
        rows.append(row)
    return rows


def write_sweep(
    root: Path,
    arms: dict[str, tuple[int, list[dict], str]],
    pairs: list[list[str]],
    yardstick: list[list[str]] | None = None,
    controls: list[list[str]] | None = None,
    branches: dict[str, str] | None = None,
) -> Path:
    """A sweep dir as the sweep writes it: manifest.json, runs/<arm>/metrics.jsonl + status.json."""
    jobs = {}
    for name, (batch, rows, state) in arms.items():
        run_dir = root / "runs" / name
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run_dir / "status.json").write_text(json.dumps({"state": state}))
        jobs[name] = {
            "kind": "arm",
            "run_dir": str(run_dir),
            "signature": f"sig{name}",
            "derived": {"batch_size": batch, "branch": (branches or {}).get(name, "warmup:w1")},
        }
    manifest = {"experiment": "synthetic", "pairs": pairs, "jobs": jobs}
    manifest |= {"yardstick": yardstick or [], "controls": controls or []}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture
def exact_sweep(tmp_path: Path) -> Path:
    """A (batch 16) and H (batch 1) with per-bin gap GAPS exactly; J (16) and B (1) 0.05 nats higher."""
    zero = np.zeros(20)
    arms = {
        "A": (16, curve(16, zero), "completed"),
        "H": (1, curve(1, -GAPS), "completed"),
        "J": (16, curve(16, zero + 0.05), "completed"),
        "B": (1, curve(1, zero + 0.05), "completed"),
    }
    return write_sweep(tmp_path / "sweep", arms, [["A", "H"], ["J", "B"]], yardstick=[["A", "J"], ["H", "B"]])


def test_matched_windows_average_the_small_batch_over_the_same_samples():
    """Batch 4 vs batch 1 (ratio 4), batch 3 vs 2 (windows of 6 samples), a Seesaw-like ramp, and a
    missing step (log_every_steps > 1): each window holds exactly the samples both arms consumed."""
    small = LoggedSteps.of(np.arange(1, 9), np.arange(1, 9) * SEQ, np.arange(8.0))  # losses 0..7
    large = LoggedSteps.of(np.arange(1, 3), np.array([4, 8]) * SEQ, np.array([10.0, 20.0]))
    w = matched_windows(large, small)
    assert list(w.start) == [0, 4 * SEQ] and list(w.end) == [4 * SEQ, 8 * SEQ]
    assert list(w.a) == [10.0, 20.0] and list(w.b) == [1.5, 5.5]  # means of 0..3 and 4..7
    three = LoggedSteps.of(np.arange(1, 5), np.arange(1, 5) * 3 * SEQ, np.array([1.0, 2.0, 3.0, 4.0]))
    two = LoggedSteps.of(np.arange(1, 7), np.arange(1, 7) * 2 * SEQ, np.arange(6.0))
    w = matched_windows(three, two)
    assert list(w.end) == [6 * SEQ, 12 * SEQ] and list(w.a) == [1.5, 3.5] and list(w.b) == [1.0, 4.0]
    # batch 2, 2, 4
    ramp = LoggedSteps.of(np.arange(1, 4), np.array([2, 4, 8]) * SEQ, np.array([1.0, 2.0, 3.0]))
    w = matched_windows(ramp, small)
    assert list(w.end) == [2 * SEQ, 4 * SEQ, 8 * SEQ] and list(w.b) == [0.5, 2.5, 5.5]
    # step 3 missing
    sparse = LoggedSteps.of(np.array([1, 2, 4, 5]), np.array([1, 2, 4, 5]) * SEQ, np.arange(4.0))
    w = matched_windows(sparse, small)
    assert list(w.end) == [1 * SEQ, 2 * SEQ, 5 * SEQ]  # the window with step 3 in it is left out


def test_exact_gaps_segments_and_spread(exact_sweep: Path):
    tables = analyze(exact_sweep, Comparison([], BinSpec(bins=20, segments=4), Margin(fraction=0.5)))
    pairs = tables.pairs.set_index(["metric", "pair"])
    row = pairs.loc[("train", "A-H")]
    # 400 windows (A's steps), H averaged over each window's 16 steps: the gap is GAPS per bin exactly.
    assert row["windows"] == 400 and row["segments"] == 4
    assert row["mean_gap"] == pytest.approx(0.010, abs=1e-12)
    segments = tables.gaps.query("pair == 'A-H' and unit == 'segment'")["gap"]
    # Each segment holds 5 bins: gaps 0.006/0.014 alternating, so 0.0092 and 0.0108 alternately.
    assert list(segments) == pytest.approx([0.0092, 0.0108, 0.0092, 0.0108], abs=1e-12)
    bins = tables.gaps.query("pair == 'A-H' and unit == 'bin'")
    assert list(bins["gap"]) == pytest.approx(list(GAPS), abs=1e-12) and set(bins["windows"]) == {20}
    # Spread: |A - J| = 0.05 and |H - B| = 0.05 + mean gap 0.01 = 0.06, so 0.055; margin half of it.
    assert row["op_spread"] == pytest.approx(0.055, abs=1e-12)
    assert row["delta"] == pytest.approx(0.0275, abs=1e-12)
    assert row["verdict"] == "equivalent" and row["reach"] < 0.0275
    jb = pairs.loc[("train", "J-B")]
    assert jb["mean_gap"] == pytest.approx(0.0, abs=1e-12) and jb["gap_se"] == pytest.approx(0.0, abs=1e-12)
    assert jb["verdict"] == "equivalent"  # a gap of exactly 0 everywhere is inside any positive margin


def test_the_yardstick_is_what_the_experiment_declares(tmp_path: Path, capsys):
    """Seesaw's layout: one pair (SD, SS) and the declared yardstick SD vs C at the same batch size."""
    zero = np.zeros(20)
    arms = {
        "SD": (4, curve(4, zero), "completed"),
        "SS": (4, curve(4, zero + 0.002), "completed"),
        "C": (4, curve(4, zero + 0.05), "completed"),
    }
    sweep = write_sweep(tmp_path / "s", arms, [["SD", "SS"]], yardstick=[["SD", "C"]])
    tables = analyze(sweep, Comparison([], BinSpec(bins=20)))
    row = tables.pairs.set_index("metric").loc["train"]
    assert row["op_spread"] == pytest.approx(0.05, abs=1e-12)  # |SD - C| only: SS, under test, is not in it
    assert row["mean_gap"] == pytest.approx(-0.002, abs=1e-12) and row["verdict"] == "equivalent"
    assert "δ = 0.25 × mean(|SD-C| 0.05) = 0.0125 nats" in capsys.readouterr().out
    assert pd.read_csv(sweep / "results" / "yardstick.csv")["abs_gap"].tolist() == pytest.approx([0.05])


def test_no_yardstick_no_margin_and_the_report_says_what_to_give(tmp_path: Path, capsys):
    zero = np.zeros(20)
    arms = {"A": (16, curve(16, zero), "completed"), "M": (16, curve(16, zero + 0.01), "completed")}
    tables = analyze(write_sweep(tmp_path / "s", arms, [["A", "M"]]), Comparison([], BinSpec(bins=20)))
    train = tables.pairs.set_index("metric").loc["train"]
    assert train["verdict"] == "no verdict: no margin"
    assert "declares no yardstick" in capsys.readouterr().out
    again = analyze(tmp_path / "s", Comparison([], BinSpec(bins=20), Margin(nats=0.05))).pairs
    assert again.set_index("metric").loc["train", "verdict"] == "equivalent"


def _yardstick_sweep(root: Path, control_gap: float, pairs: list[list[str]]) -> pd.DataFrame:
    """sqrt_rule's layout: A, J (batch 16), H, B, D (batch 1); D the control, `control_gap` off A."""
    zero = np.zeros(20)
    arms = {
        "A": (16, curve(16, zero), "completed"),
        "H": (1, curve(1, -GAPS), "completed"),
        "J": (16, curve(16, zero + 0.02), "completed"),
        "B": (1, curve(1, zero + 0.03), "completed"),
        "D": (1, curve(1, zero + control_gap), "completed"),
    }
    sweep = write_sweep(root, arms, pairs, yardstick=[["A", "J"], ["H", "B"]], controls=[["A", "D"]])
    table = analyze(sweep, Comparison([], BinSpec(bins=20))).pairs
    return table[table["metric"] == "train"].set_index("pair")


def test_a_control_or_an_extra_pair_never_moves_the_margin(tmp_path: Path):
    """The issue's case: with the control inside the spread, the worse the control, the wider the
    margin. Declared, δ = ¼ mean(|A - J| 0.02, |H - B| 0.03 + 0.01) whatever D does or is added."""
    base = _yardstick_sweep(tmp_path / "a", 0.3, [["A", "H"], ["J", "B"]])
    worse = _yardstick_sweep(tmp_path / "b", 3.0, [["A", "H"], ["J", "B"]])
    extra = _yardstick_sweep(tmp_path / "c", 0.3, [["A", "H"], ["J", "B"], ["A", "B"], ["H", "D"]])
    expected = 0.25 * (0.02 + 0.04) / 2
    for table in (base, worse, extra):
        assert table["delta"].to_numpy() == pytest.approx(np.full(len(table), expected), abs=1e-12)
    assert base.loc["A-D", "role"] == "control" and base.loc["A-H", "role"] == "pair"
    assert base.loc["A-D", "verdict"] == worse.loc["A-D", "verdict"] == "not equivalent"
    assert list(base.index) == ["A-H", "J-B", "A-D"]  # the questions, then the controls


def test_pairs_not_compared_are_named_with_why(tmp_path: Path, capsys):
    """A pair whose arm never logged, and one whose arms started from different warmups (an arm
    rerun with a config that redid the warmup), are reported, not dropped silently."""
    zero = np.zeros(20)
    arms = {
        "A": (16, curve(16, zero), "completed"),
        "H": (1, curve(1, zero), "completed"),
        "J": (16, curve(16, zero + 0.02), "completed"),
    }
    sweep = write_sweep(
        tmp_path / "s",
        arms,
        [["A", "H"], ["J", "B"]],
        yardstick=[["A", "J"]],
        branches={"A": "warmup:new", "H": "warmup:old", "J": "warmup:old"},
    )
    manifest = json.loads((sweep / "manifest.json").read_text())
    manifest["arms"] = ["A", "H", "J", "B"]
    (sweep / "manifest.json").write_text(json.dumps(manifest))
    tables = analyze(sweep, Comparison([], BinSpec(bins=20)))
    assert tables.pairs.empty
    out = capsys.readouterr().out
    assert "A-H: not compared: A started from warmup:new but H from warmup:old" in out.replace("\n", " ")
    assert "J-B: not compared: arm B logged no rows yet" in out
    assert "Yardstick pair(s) not measured: A-J (A started from warmup:new" in out.replace("\n", " ")


def test_verdicts_in_their_regimes():
    def est(mean: float, se: float) -> Estimate:
        return Estimate(mean, se, 20.0, 100)

    inside = [est(0.01, 0.001)] * 4
    assert verdict(inside, 0.05, 0.05) == "equivalent"
    assert verdict(inside, 0.002, 0.05) == "not equivalent"
    assert verdict(inside, 0.0115, 0.05) == "inconclusive"  # 90% CIs reach 0.0117
    assert verdict(inside, math.nan, 0.05) == "no verdict: no margin"
    # One segment off by far more than the margin decides, whatever the mean of all segments.
    assert verdict([est(0.0, 0.001)] * 3 + [est(0.2, 0.001)], 0.05, 0.05) == "not equivalent"
    assert verdict([est(0.0, math.nan)] * 4, 0.05, 0.05) == "no verdict: too few samples"


def test_paired_validation_uses_the_per_sequence_losses(tmp_path: Path):
    """Both arms evaluated on the same 8 sequences: the paired SE is the SD of the differences / sqrt(8)."""
    rng = np.random.default_rng(0)
    rows = {name: curve(16, np.zeros(20)) for name in "AB"}
    base_seq = rng.normal(3.0, 0.5, 8)  # sequence difficulty, common to both arms
    diffs = rng.normal(0.02, 0.004, 8)
    for row in rows["A"]:
        if "val_loss" in row:
            row["val_sequence_loss"] = list(base_seq + diffs)
    for row in rows["B"]:
        if "val_loss" in row:
            row["val_sequence_loss"] = list(base_seq)
    arms = {"A": (16, rows["A"], "completed"), "B": (16, rows["B"], "completed")}
    tables = analyze(
        write_sweep(tmp_path / "s", arms, [["A", "B"]]), Comparison([], margin=Margin(nats=0.05))
    )
    val = tables.gaps.query("metric == 'val'")
    assert val["gap"].to_numpy() == pytest.approx(np.full(len(val), diffs.mean()), abs=1e-12)
    assert val["gap_se"].to_numpy() == pytest.approx(
        np.full(len(val), diffs.std(ddof=1) / math.sqrt(8)), rel=1e-9
    )
    assert tables.pairs.set_index("metric").loc["val", "verdict"] == "equivalent"
    # The same training losses: pairing removed all the noise, which the gain says (not blank).
    assert tables.pairs.set_index("metric").loc["train", "pairing_gain"] == math.inf
    # analysis.until_tokens caps the validation evaluations as it caps the training windows.
    cap = int(val["bin_end"].iloc[len(val) // 2])
    capped = analyze(
        write_sweep(tmp_path / "c", arms, [["A", "B"]]),
        Comparison([], BinSpec(until_tokens=cap), margin=Margin(nats=0.05)),
    )
    kept = capped.gaps.query("metric == 'val'")["bin_end"]
    assert 0 < len(kept) < len(val) and kept.max() == cap
    assert capped.pairs.set_index("metric").loc["val", "to_tokens"] == cap


def test_arm_noise_on_known_noise_and_no_runtime_warnings(tmp_path: Path):
    """Gaussian per-step noise 0.1 (batch 16) and 0.4 (batch 1), no B_simple logged: the per-arm
    noise is recovered and nothing warns (no all-NaN medians)."""
    zero = np.zeros(20)
    rows = {"A": curve(16, zero, noise=0.1, seed=1), "H": curve(1, zero, noise=0.4, seed=2)}
    for r in rows["A"] + rows["H"]:
        r.pop("b_simple")
    arms = {"A": (16, rows["A"], "completed"), "H": (1, rows["H"], "completed")}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        tables = analyze(write_sweep(tmp_path / "s", arms, [["A", "H"]]), Comparison([], BinSpec(bins=20)))
    context = tables.arms.set_index("arm")
    # The std estimate from m successive differences has relative SE ~ 1/sqrt(m); 4 SE tolerances.
    assert context.loc["A", "loss_std"] == pytest.approx(0.1, rel=4 / math.sqrt(400))
    assert context.loc["H", "loss_std"] == pytest.approx(0.4, rel=4 / math.sqrt(6400))
    row = tables.pairs.set_index("metric").loc["train"]
    # Same noise model, no real gap: the mean gap lies within 4 of its SEs of zero.
    assert abs(row["mean_gap"]) < 4 * row["gap_se"]
    # Paired over 16 small steps per window: the window's noise is the two arms' own, 0.1 each.
    assert row["paired_noise"] == pytest.approx(math.sqrt(0.1**2 + 0.1**2), rel=0.2)


def test_outputs_are_written_and_printed(exact_sweep: Path, capsys):
    analyze(exact_sweep, Comparison([["A", "B"]], BinSpec(bins=20), Margin(nats=0.03)))
    out = exact_sweep / "results"
    printed = capsys.readouterr().out
    for name in ("pairs.csv", "pairs.md", "pairs.tex", "gaps.csv", "bins.csv", "arms.csv", "runs.parquet"):
        assert (out / name).stat().st_size > 0
        assert f"wrote {out / name}" in printed
    for name in ("curves.png", "equivalence.png", "pairing.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    pairs = pd.read_csv(out / "pairs.csv")
    assert list(pairs["pair"]) == ["A-H", "A-H", "J-B", "J-B", "A-B", "A-B"]
    assert list(pairs["metric"]) == ["train", "val"] * 3
    assert "A-H (train): equivalent within ±0.03 nats" in printed
    assert "A-B (train): NOT equivalent: in some segment A is off B by more than ±0.03 nats" in printed
    # pairs.md reads at 100 columns down to its detail tables.
    md = (out / "pairs.md").read_text().split("## detail")[0]
    assert max(len(line) for line in md.splitlines() if not line.startswith("- ")) <= 100
    tex = (out / "pairs.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and tex.count(r"\\") == 1 + 6 + 2
    bins = pd.read_csv(out / "bins.csv")
    assert set(bins["arm"]) == {"A", "H", "J", "B"} and bins.groupby("arm")["bin"].nunique().min() == 20
    runs = pd.read_parquet(out / "runs.parquet")
    assert len(runs[(runs["arm"] == "H") & (runs["kind"] == "train")]) == 6400


def test_pairs_given_on_the_command_line_leave_the_declared_ones_alone(exact_sweep: Path):
    """analysis.pairs=[[H,B]] adds a pair; A-H keeps its yardstick and its verdict."""
    plain = analyze(exact_sweep, Comparison([], BinSpec(bins=20), Margin(fraction=0.5))).pairs
    more = analyze(exact_sweep, Comparison([["H", "B"]], BinSpec(bins=20), Margin(fraction=0.5))).pairs
    key = ["metric", "pair", "op_spread", "delta", "verdict"]
    assert more.set_index(["metric", "pair"]).loc[("train", "A-H"), key[2:]].tolist() == (
        plain.set_index(["metric", "pair"]).loc[("train", "A-H"), key[2:]].tolist()
    )


def test_a_pair_naming_an_unknown_arm_is_refused(exact_sweep: Path):
    with pytest.raises(LookupError, match=r"unknown arm\(s\) Z; the sweep's arms: A, B, H, J"):
        analyze(exact_sweep, Comparison([["A", "Z"]]))
    assert not (exact_sweep / "results").exists()


def test_segments_merge_on_tokens_later_wins(tmp_path: Path):
    """A requeued run re-logs the rows after its checkpoint: one row per token, the later value."""
    first = curve(16, np.zeros(20), steps=300)
    second = [dict(r, loss=r["loss"] + 1.0) for r in curve(16, np.zeros(20))[250:]]  # resumed from step 250
    table = long_table([ArmRows("A", "s", 16, "completed", pd.DataFrame(first + second))])
    train = table[table["kind"] == "train"]
    assert train["tokens"].is_unique and len(train) == STEPS_LARGE
    resumed = train[train["step"] > 250]
    assert (resumed["loss"] > 2.5).all() and (train[train["step"] <= 250]["loss"] < 3.5).all()


def test_crashed_arm_is_compared_up_to_where_it_stopped(tmp_path: Path, capsys):
    zero = np.zeros(20)
    arms = {"A": (16, curve(16, zero), "completed"), "H": (1, curve(1, zero, steps=2000), "failed")}
    tables = analyze(write_sweep(tmp_path / "s", arms, [["A", "H"]]), Comparison([], BinSpec(bins=10)))
    row = tables.pairs.set_index("metric").loc["train"]
    assert row["to_tokens"] == 2000 * SEQ and row["windows"] == 125
    assert tables.gaps.query("unit == 'bin'")["bin_end"].max() == 2000 * SEQ
    out = capsys.readouterr().out
    assert "Arm H is failed at 256,000 tokens: its pairs are compared up to where both arms got" in out


# -- the W&B source ---------------------------------------------------------------------------------


def standin_runs(standin: WandbStandin, arms: dict[str, tuple[int, list[dict], str]]) -> None:
    for i, (name, (batch, rows, state)) in enumerate(arms.items()):
        config = {"arm": {"batch_size": batch}, "run": {"signature": f"sig{name}"}, "experiment": "synthetic"}
        standin.add(
            StandinRun(f"run{name}", name, "synthetic", "arm", state, config, rows, f"2026-01-0{i + 1}")
        )
    standin.add(
        StandinRun("warm", "warmup", "synthetic", "warmup", "finished", {}, [{"tokens": 1, "loss": 9.0}])
    )


@pytest.fixture
def wandb_env(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("WANDB_API_KEY", "standin-key-" + "0" * 40)  # the stand-in only checks it is sent
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-client-cache"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    # The client starts its service in this process and records it in WANDB_SERVICE; left there,
    # every later subprocess (the trainer tests' runs) would try to use this process's service.
    monkeypatch.setenv("WANDB_SERVICE", "")


def _select(standin: WandbStandin, **changes) -> WandbSelection:
    return WandbSelection(ENTITY, standin.project, "synthetic", base_url=standin.base_url, **changes)


def logged_arms(sweep_dir: Path) -> dict[str, tuple[int, list[dict], str]]:
    """The arms of a sweep dir as the stand-in serves them: batch, logged rows, state finished."""
    manifest = read_manifest(sweep_dir)
    return {
        name: (job["derived"]["batch_size"], read_metrics(job["run_dir"]), "finished")
        for name, job in manifest["jobs"].items()
    }


def _history_requests(standin: WandbStandin, run: str) -> int:
    return sum(standin.count(op, run) for op in ("RunParquetHistory", "RunHistoryKeys", "GET history"))


def test_wandb_source_gives_the_run_dir_table_and_caches(exact_sweep: Path, wandb_env, tmp_path: Path):
    arms = logged_arms(exact_sweep)
    # H was requeued: the W&B run holds a second segment re-logging the last 300 rows (later wins).
    batch, rows, _ = arms["H"]
    arms["H"] = (batch, rows[:-100] + rows[-300:], "finished")
    arms["B"] = (1, arms["B"][1][:4000], "running")  # still running: the rest arrives later
    cache = tmp_path / "cache"
    with WandbStandin() as standin:
        standin_runs(standin, arms)
        standin.runs["runB"].exported = 3000  # rows past the last parquet export are live data
        got = long_table(collect_wandb(_select(standin), cache, progress=False))
        assert _history_requests(standin, "runA") > 0
        expected = long_table(
            [ArmRows(n, f"sig{n}", b, "x", pd.DataFrame(r)) for n, (b, r, _) in arms.items()]
        )
        cols = ["arm", "kind", "tokens", "loss", "lr", "b_simple"]
        pd.testing.assert_frame_equal(got[cols], expected[cols])
        assert set(got["state"]) == {"finished", "running"}

        # Second collection: finished runs come from the cache without a history request; the running
        # run is fetched from its last cached step on and brings its new rows.
        before = {r: _history_requests(standin, f"run{r}") for r in "AHJB"}
        standin.runs["runB"].rows = curve(1, np.zeros(20) + 0.05)
        again = long_table(collect_wandb(_select(standin), cache, progress=False))
        assert {r: _history_requests(standin, f"run{r}") - before[r] for r in "AHJ"} == {
            "A": 0,
            "H": 0,
            "J": 0,
        }
        assert _history_requests(standin, "runB") > before["B"]
        assert len(again[(again["arm"] == "B") & (again["kind"] == "train")]) == 6400


def test_wandb_rate_limits_are_backed_off(wandb_env, tmp_path: Path):
    arms = {"A": (16, curve(16, np.zeros(20)), "finished"), "H": (1, curve(1, np.zeros(20)), "finished")}
    with WandbStandin() as standin:
        standin_runs(standin, arms)
        # More 429s than the client retries on its own (about 20 at Retry-After 0): ours must take over.
        standin.throttle("RunParquetHistory", 45)
        got = collect_wandb(_select(standin, backoff_s=0.5, workers=2), tmp_path / "c1", progress=False)
        assert {a.arm for a in got} == {"A", "H"}
        throttled = [r for r in standin.requests if r.status == 429]
        assert len(throttled) == 45
        waits = np.diff([r.at for r in standin.requests if r.op == "RunParquetHistory"])
        assert waits.max() >= 0.5  # the client's own retries come ~0.05 s apart: this wait is ours

        standin.throttle("RunParquetHistory", 10_000)
        with pytest.raises(RuntimeError, match=r"HTTP 429 \(rate limited\) for run run[AH]: 2 attempts"):
            collect_wandb(_select(standin, backoff_s=0.01, attempts=2), tmp_path / "c2", progress=False)


def test_analysis_cli_reads_wandb_and_publishes(exact_sweep: Path, wandb_env, tmp_path: Path):
    arms = logged_arms(exact_sweep)
    out = tmp_path / "wandb-results"
    with WandbStandin() as standin:
        standin_runs(standin, arms)
        cmd = [
            sys.executable,
            "-m",
            "analysis",
            "source=wandb",
            f"wandb.entity={ENTITY}",
            f"wandb.project={standin.project}",
            "wandb.group=synthetic",
            f"wandb.base_url={standin.base_url}",
            f"sweep.root={tmp_path / 'sweeps'}",
            f"analysis.out={out}",
            "analysis.pairs=[[A,H],[J,B]]",
            "analysis.yardstick=[[A,J],[H,B]]",
            "analysis.margin_fraction=0.5",
            "wandb.publish=true",
            "wandb.mode=offline",
        ]
        res = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=os.environ.copy()
        )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| A-H |" in res.stdout and "A-H (train): equivalent" in res.stdout
    assert (
        tmp_path / "sweeps" / "synthetic" / "wandb_cache" / ENTITY / standin.project / "runA.parquet"
    ).exists()
    # The offline analysis run holds the tables and the plots as W&B media files.
    run_dirs = list((out / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1 and "published the analysis to W&B group synthetic" in res.stdout
    media = {
        p.parent.name + "/" + p.name.split("_")[0] for p in (run_dirs[0] / "files" / "media").rglob("*.*")
    }
    assert {
        "table/pairs",
        "table/arms",
        "table/bins",
        "images/curves",
        "images/equivalence",
        "images/pairing",
    } <= media
    assert "standin-key" not in "".join(p.read_text(errors="ignore") for p in run_dirs[0].rglob("*.yaml"))


def test_bad_input_is_refused_before_anything_is_written(tmp_path: Path):
    cmd = [
        sys.executable,
        "-m",
        "analysis",
        "source=nowhere",
        "+experiment=sqrt_rule",
        f"sweep.root={tmp_path}",
    ]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "source=nowhere: use run_dirs" in res.stderr
    res = subprocess.run(
        cmd[:3] + ["source=wandb", "wandb.group=g"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2 and "needs wandb.entity, wandb.project and wandb.group" in res.stderr
    res = subprocess.run(
        [*cmd[:3], "+experiment=sqrt_rule", f"sweep.root={tmp_path}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "holds no manifest.json" in res.stderr
    assert not any(tmp_path.iterdir())  # nothing written, not even a log file in the working directory


def test_a_ratio_sweep_is_compared_per_ratio_and_a_shared_run_counts_for_both(tmp_path: Path):
    """`experiment.ratio=4,16`: A is one run (kept under both names); A-H is compared at each ratio."""
    zero = np.zeros(20)
    root = write_sweep(
        tmp_path / "s",
        {"A4": (16, curve(16, zero), "completed"), "H4": (4, curve(4, zero + 0.01), "completed")},
        [["A", "H"]],
    )
    h16 = root / "runs" / "H16"
    h16.mkdir()
    (h16 / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve(1, zero - 0.02)))
    (h16 / "status.json").write_text(json.dumps({"state": "completed"}))
    manifest = json.loads((root / "manifest.json").read_text())
    jobs = manifest["jobs"]
    for name, base, ratio in (("A4", "A", 4), ("H4", "H", 4)):
        jobs[name]["derived"] |= {"base": base, "variant": f"experiment.ratio={ratio}"}
    jobs["H16"] = {
        "kind": "arm",
        "run_dir": str(h16),
        "signature": "sigH16",
        "derived": {"batch_size": 1, "base": "H", "variant": "experiment.ratio=16"},
    }
    jobs["A16"] = {
        **jobs["A4"],
        "same_as": "A4",
        "derived": {**jobs["A4"]["derived"], "variant": "experiment.ratio=16"},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    pairs = analyze(root, Comparison([], margin=Margin(nats=0.05))).pairs.set_index(["metric", "pair"])
    assert pairs.loc[("train", "A-H[experiment.ratio=4]"), "mean_gap"] == pytest.approx(-0.01, abs=1e-9)
    assert pairs.loc[("train", "A-H[experiment.ratio=16]"), "mean_gap"] == pytest.approx(0.02, abs=1e-9)


def test_regime_map_from_the_logged_noise_scale(tmp_path: Path, capsys):
    """Arms log one step's unbiased |G|^2 and tr(Sigma) every 8th step, scattered around a known
    B_noise of 8 sequences (|G|^2 noisy and sometimes negative, as one step's estimate is): arms.csv
    reports B_noise as the ratio of their sums, 8 (1024 tokens), so A at batch 16 is beyond it
    (B / B_noise = 2) and H at batch 1 noise-dominated (1/8); the pair carries both regimes and
    regime.png is drawn."""
    rng = np.random.default_rng(3)
    zero = np.zeros(20)

    def measured(batch: int) -> list[dict]:
        rows = curve(batch, zero, noise=0.01, seed=batch)
        for row in rows[7::8]:
            signal = 4.0 + rng.normal(0.0, 6.0)
            row |= {"grad_sq": signal, "noise_trace": 32.0 + 8.0 * (signal - 4.0)}  # exact ratio on average
        return rows

    sweep = write_sweep(
        tmp_path / "sweep",
        {"A": (16, measured(16), "completed"), "H": (1, measured(1), "completed")},
        [["A", "H"]],
    )
    tables = analyze(sweep, Comparison([], BinSpec(bins=20), Margin(nats=0.05)))
    arms = pd.read_csv(sweep / "results" / "arms.csv").set_index("arm")
    assert arms.loc["A", "b_noise"] == pytest.approx(8.0, rel=1e-9)
    assert arms.loc["H", "b_noise_tokens"] == pytest.approx(8.0 * SEQ, rel=1e-9)
    assert arms.loc["A", "b_over_noise"] == pytest.approx(2.0) and arms.loc["A", "regime"] == "beyond B_noise"
    assert arms.loc["H", "regime"] == "noise-dominated"
    row = tables.pairs.set_index("metric").loc["train"]
    assert (row["regime_a"], row["regime_b"]) == ("beyond B_noise", "noise-dominated")
    assert row["b_over_noise_b"] == pytest.approx(1 / 8)
    assert (sweep / "results" / "regime.png").read_bytes()[:4] == b"\x89PNG"
    assert "## regime" in capsys.readouterr().out


def test_a_skip_past_every_arm_says_so_instead_of_failing(exact_sweep: Path, capsys):
    """The experiment's declared transient (or analysis.skip_tokens) beyond what the arms reached:
    empty tables and a line that says why and what to do, not an error."""
    tables = analyze(exact_sweep, Comparison([], BinSpec(skip_tokens=10**9), Margin(nats=0.03)))
    assert tables.pairs.empty and (exact_sweep / "results" / "pairs.csv").exists()
    printed = capsys.readouterr().out
    assert "No pair has samples to compare after skip_tokens=1,000,000,000" in printed
    assert "the arms reached 819,200 tokens" in printed


def test_an_analysis_with_other_options_is_kept_aside_not_overwritten(exact_sweep: Path, capsys):
    """The same options replace the tables (recomputed from the run files); other options move the
    earlier analysis aside, whole, and say where."""
    analyze(exact_sweep, Comparison([], BinSpec(bins=20), Margin(nats=0.03)))
    first = (exact_sweep / "results" / "pairs.md").read_text()
    analyze(exact_sweep, Comparison([], BinSpec(bins=20), Margin(nats=0.03)))
    assert "replacing the analysis in" in capsys.readouterr().out
    assert [p.name for p in exact_sweep.glob("results*")] == ["results"]
    analyze(exact_sweep, Comparison([], BinSpec(bins=10), Margin(nats=0.03)))
    aside = [p for p in exact_sweep.glob("results-*")]
    assert len(aside) == 1 and (aside[0] / "pairs.md").read_text() == first
    assert f"kept as {aside[0]}" in capsys.readouterr().out
    assert (
        json.loads((exact_sweep / "results" / "analysis.json").read_text())["options"]["spec"]["bins"] == 10
    )


def test_publishing_from_run_dirs_goes_to_the_sweeps_group(exact_sweep: Path, wandb_env, tmp_path: Path):
    """Without wandb.group the analysis run joins the group the arms logged to: the experiment's."""
    cmd = [sys.executable, "-m", "analysis", f"sweep.dir={exact_sweep}", "analysis.margin=0.03"]
    cmd += ["wandb.publish=true", "wandb.mode=offline"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert res.returncode == 0, res.stderr[-3000:]
    assert "published the analysis to W&B group synthetic:" in res.stdout


def test_lr_ladders_rank_variants_by_their_best_arm():
    """Two variants at three lrs each on the same 32 validation sequences (a shared per-sequence
    difficulty, which the pairing removes): each ladder's best arm is its lowest final loss, the
    ladders are ranked by it, and the runner-up's paired gap to the leader holds its true 0.05
    nats within an interval that excludes 0 (per-sequence noise 0.01); a ladder none of whose arms
    ran is left out."""
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 0.5, 32)
    truth = {"X_half": 3.0, "X": 2.9, "X_x2": 3.1, "Y_half": 3.2, "Y": 3.05, "Y_x2": 2.95}
    arms = {}
    for name, final in truth.items():
        arm = sim_arm(name, 16, 3.5 - np.linspace(0, 0.5, 64) + rng.normal(0, 0.01, 64))
        per_sequence = final + difficulty + rng.normal(0, 0.01, 32)
        arms[name] = replace(
            arm,
            val_tokens=np.array([arm.tokens]),
            val_loss=np.array([per_sequence.mean()]),
            val_sequences={arm.tokens: per_sequence},
        )
    ladders = {"x": ["X_half", "X", "X_x2"], "y": ["Y_half", "Y", "Y_x2"], "z": ["Z"]}
    table = best_of_ladders(arms, ladders, BinSpec(), Margin(nats=0.02), {})
    assert list(table["ladder"]) == ["x", "y"] and list(table["best_arm"]) == ["X", "Y_x2"]
    assert list(table["rungs"]) == [3, 3]
    runner_up = table.iloc[1]
    assert runner_up["vs"] == "X" and 0 < runner_up["ci_low"] < 0.05 < runner_up["ci_high"]
