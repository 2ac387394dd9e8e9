"""``fm-sweep --bench=train``: the accuracy sweep's CSV, heat map and inner-steps curve on a tiny
grid of real fm-train runs (one point fails on purpose and must be recorded as failed), and its
pieces on hand-made rows."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import accuracy_sweep

ROOT = Path(__file__).resolve().parents[1]


def row(inner, outer, score=None, error=""):
    return {"inner_lr": inner, "outer_lr": outer, "score": score, "metric": "accuracy",
            "ci95": 0.02, "val_step": 2, "train_s": 1.0, "run_dir": "x", "error": error}


def test_best_row_and_heat_map_mark_failed_cells(tmp_path):
    grid = [("inner_lr", ["0.1", "0.4"]), ("outer_lr", ["1e-3", "3e-3"])]
    rows = [row("0.1", "1e-3", 0.5), row("0.1", "3e-3", 0.7), row("0.4", "1e-3", 0.6),
            row("0.4", "3e-3", error="exit 1: diverged")]
    assert accuracy_sweep.best_row(rows)["outer_lr"] == "3e-3"
    mse = [dict(r, metric="mse") for r in rows[:3]]
    assert accuracy_sweep.best_row(mse)["score"] == 0.5            # lowest MSE
    assert accuracy_sweep.best_row([rows[3]]) is None
    path = tmp_path / "heat.png"
    assert accuracy_sweep.heat_map(rows, grid, path, "test")
    assert path.stat().st_size > 1000
    one = accuracy_sweep.heat_map(rows[:2], [("outer_lr", ["1e-3", "3e-3"])],
                                  tmp_path / "one.png", "one flag")
    assert one and (tmp_path / "one.png").exists()


@pytest.mark.parametrize("grid, args, named", [
    ([("a", ["1"]), ("b", ["1"]), ("c", ["1"])], [], "one or two flags"),
    ([("out_dir", ["x"])], [], "--out_dir is set by the sweep"),
    ([("inner_lr", ["1"])], ["--out_dir=/tmp/x"], "sets --out_dir itself"),
    ([("inner_lr", ["1"])], ["--val_every=0"], "must validate"),
])
def test_check_names_what_the_sweep_cannot_run(grid, args, named):
    with pytest.raises(ValueError, match=named):
        accuracy_sweep.check(grid, args)


@pytest.mark.slow
def test_tiny_maml_sweep_writes_csv_heat_map_and_curve_and_records_a_failed_point(tmp_path):
    table = tmp_path / "sweep.csv"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.sweep", "--bench=train", "--grid=inner_lr=0.1,0.4",
         "--grid=outer_lr=1e-3,abc", f"--csv={table}", "--jobs=2", "--curve_steps=1,2",
         "--curve_episodes=4", "--", "--algorithm=maml", "--preset=maml_mnist_mlp",
         "--data=synthetic", "--hidden=8", "--steps=2", "--meta_batch=2", "--val_every=2",
         "--val_episodes=4", "--log_every=1", "--checkpoint_every=2", "--nojit"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(table.open()))
    assert [(r["inner_lr"], r["outer_lr"]) for r in rows] == [
        ("0.1", "1e-3"), ("0.1", "abc"), ("0.4", "1e-3"), ("0.4", "abc")]
    for r in rows:
        if r["outer_lr"] == "abc":
            assert r["error"].startswith("exit ") and "outer_lr" in r["error"], r
            assert r["score"] == ""
        else:
            assert r["error"] == "" and r["metric"] == "accuracy" and r["val_step"] == "2"
            assert 0 <= float(r["score"]) <= 1 and float(r["ci95"]) >= 0
            assert (Path(r["run_dir"]) / "config.json").exists()
    assert "2 of 4 points failed" in done.stdout
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    curve = list(csv.DictReader((tmp_path / "sweep_inner_steps.csv").open()))
    assert [c["inner_steps"] for c in curve] == ["1", "2"]
    assert all(c["error"] == "" and 0 <= float(c["score"]) <= 1 for c in curve), curve
    assert (tmp_path / "sweep_inner_steps.png").exists()
