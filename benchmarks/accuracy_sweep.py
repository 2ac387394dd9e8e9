"""``fm-sweep --bench=train``: tune by accuracy (the tutorial's exercise 2). Every grid point is a
short ``fm-train`` run in its own subprocess, scored by its final validation (the run's
``history.jsonl``: mean and 95% interval over the validation episodes, which share the seed and
so are the same episodes for every point). Then the best point's final checkpoint is scored by
``fm-eval`` on those validation classes after each of ``curve_steps`` test-time inner steps.

Outputs, beside the CSV: a heat map of the score over the (one or two) swept flags with the
interval in each cell (``.png``), and for MAML-family runs the inner-steps curve
(``_inner_steps.csv`` and ``_inner_steps.png``). A point that fails (bad value, divergence,
timeout) is a row with its error; the sweep goes on. ``jobs`` points run at once.

This module does not import TensorFlow: the work happens in the subprocesses.
"""

import concurrent.futures
import csv
import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

COLUMNS = ("score", "metric", "ci95", "val_step", "train_s", "run_dir", "error")
CURVE_COLUMNS = ("inner_steps", "score", "ci95", "metric", "checkpoint", "error")
# Flags the sweep sets itself on every fm-train run.
OWN_FLAGS = ("out_dir", "resume")


def check(grid, base_args):
    """``ValueError`` unless the grid has one or two flags (a heat map's axes) and the fm-train
    arguments leave ``--out_dir``/``--resume`` to the sweep and validate (``--val_every`` > 0)."""
    if not 1 <= len(grid) <= 2:
        raise ValueError(f"--bench=train sweeps one or two flags (the heat map's axes), got "
                         f"{len(grid)}: {[name for name, _ in grid]}")
    for name, _ in grid:
        if name in OWN_FLAGS:
            raise ValueError(f"--grid: --{name} is set by the sweep")
    for arg in base_args:
        name = arg.lstrip("-").split("=", 1)[0]
        if name in OWN_FLAGS:
            raise ValueError(f"{arg}: the sweep sets --{name} itself (see --runs_dir)")
        if name == "val_every" and arg.split("=", 1)[-1].strip() == "0":
            raise ValueError(f"{arg}: every run must validate (--val_every > 0); its final "
                             "validation is its score")


def cell_name(point):
    """A folder name for a grid point, ``inner_lr=0.1__outer_lr=0.001`` (no ',': fm-eval's
    ``--checkpoint`` is a list)."""
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "__".join(f"{k}={v}" for k, v in point.items()))


def _tail(text):
    """The last line of a failed run's stderr that says why (not absl's hint to ask for help)."""
    lines = [line for line in text.splitlines()
             if line.strip() and not line.startswith("Pass --helpshort")]
    return lines[-1].strip() if lines else ""


def final_validation(run_dir):
    """The last validation record of a run's ``history.jsonl``, or ``None``."""
    history = Path(run_dir, "history.jsonl")
    if not history.exists():
        return None
    records = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    validations = [r for r in records if r.get("split") == "val"]
    return validations[-1] if validations else None


def _score(record):
    metric = "accuracy" if "accuracy" in record else "mse"
    return metric, record[metric], record.get(metric + "_ci95", "")


def train_point(point, base_args, runs_dir, timeout):
    """One fm-train run (resumed if its folder holds checkpoints already): its CSV row."""
    run_dir = Path(runs_dir, cell_name(point))
    resume = any(Path(run_dir, "checkpoints").glob("ckpt-*"))
    command = [sys.executable, "-m", "benchmarks.train", *base_args,
               *(f"--{k}={v}" for k, v in point.items()), f"--out_dir={run_dir}"]
    command += ["--resume"] if resume else []
    row = {**{c: "" for c in COLUMNS}, **point, "run_dir": str(run_dir)}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(row, error=f"timed out after {timeout} s")
    row["train_s"] = round(time.perf_counter() - start, 1)
    if done.returncode != 0:
        return dict(row, error=f"exit {done.returncode}: {_tail(done.stderr)}")
    record = final_validation(run_dir)
    if record is None:
        return dict(row, error=f"no validation record in {run_dir}/history.jsonl")
    metric, score, ci = _score(record)
    return dict(row, metric=metric, score=score, ci95=ci, val_step=record["step"])


def curve_point(checkpoint, steps, episodes, seed, timeout, extra=()):
    """fm-eval of ``checkpoint`` on the validation classes after ``steps`` inner steps: a row.
    ``extra``: more fm-eval arguments (the runs' ``--jit``/``--nojit``)."""
    command = [sys.executable, "-m", "benchmarks.evaluate", f"--checkpoint={checkpoint}",
               "--eval_split=val", f"--num_episodes={episodes}", f"--eval_seed={seed}",
               f"--inner_steps={steps}", "--json", *extra]
    row = {**{c: "" for c in CURVE_COLUMNS}, "inner_steps": steps, "checkpoint": checkpoint}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(row, error=f"timed out after {timeout} s")
    if done.returncode != 0:
        return dict(row, error=f"exit {done.returncode}: {_tail(done.stderr)}")
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    records = [r for r in records if r.get("inner_steps") == steps]
    if not records:
        return dict(row, error="fm-eval printed no result")
    metric, score, ci = _score(records[-1])
    return dict(row, metric=metric, score=score, ci95=ci)


def run_all(function, arguments, jobs, describe):
    """``function(*a)`` for every ``a`` in ``arguments``, ``jobs`` at once; results in order,
    each printed (``describe(a, result)``) as it finishes."""
    results = [None] * len(arguments)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(function, *a): i for i, a in enumerate(arguments)}
        for count, future in enumerate(concurrent.futures.as_completed(futures), 1):
            i = futures[future]
            results[i] = future.result()
            print(f"[{count}/{len(arguments)}] {describe(arguments[i], results[i])}", flush=True)
    return results


def _summary(row):
    if row["error"]:
        return f"failed: {row['error']}"
    return f"{row['metric']} {row['score']:.4f} ± {row['ci95']:.4f}"


def best_row(rows):
    """The best successful row (highest accuracy, lowest MSE), or ``None``."""
    good = [r for r in rows if not r["error"]]
    if not good:
        return None
    sign = 1 if good[0]["metric"] == "accuracy" else -1
    return max(good, key=lambda r: sign * r["score"])


def write_csv(path, rows, first):
    with open(path, "w", newline="") as f:
        names = list(first) + [c for c in rows[0] if c not in first]
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed (pip install 'functional_meta[plot]'): no plots")
        return None


def heat_map(rows, grid, path, title):
    """The score of every grid point as a heat map (first flag down, second across), each cell
    labelled with its score and interval, failed cells grey and marked. False without
    matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    import numpy as np
    (y_name, y_values), (x_name, x_values) = (grid + [("", [""])])[:2]
    values = np.full((len(y_values), len(x_values)), np.nan)
    labels = [["failed"] * len(x_values) for _ in y_values]
    metric = next((r["metric"] for r in rows if not r["error"]), "accuracy")
    percent = metric == "accuracy"
    for row in rows:
        i = y_values.index(row[y_name])
        j = x_values.index(row[x_name]) if x_name else 0
        if not row["error"]:
            values[i, j] = row["score"] * (100 if percent else 1)
            ci = row["ci95"] * (100 if percent else 1) if row["ci95"] != "" else float("nan")
            labels[i][j] = (f"{values[i, j]:.1f}%\n± {ci:.1f}" if percent
                            else f"{values[i, j]:.3g}\n± {ci:.2g}")
    fig, ax = plt.subplots(figsize=(1.6 * len(x_values) + 2.2, 1.0 * len(y_values) + 1.8))
    cmap = plt.get_cmap("viridis" if percent else "viridis_r").with_extremes(bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, aspect="auto")
    finite = values[np.isfinite(values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(len(y_values)):
        for j in range(len(x_values)):
            dark = np.isfinite(values[i, j]) and (values[i, j] < middle) == percent
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=9,
                    color="white" if dark else "black")
    ax.set_xticks(range(len(x_values)), x_values)
    ax.set_yticks(range(len(y_values)), y_values)
    ax.set_xlabel(x_name or "")
    ax.set_ylabel(y_name)
    fig.colorbar(image, ax=ax, label=f"validation {metric}" + (" (%)" if percent else ""))
    ax.set_title(textwrap.fill(title, 70), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def curve_plot(rows, path, title):
    """Score against test-time inner steps with 95% intervals. False without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    good = [r for r in rows if not r["error"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    scale = 100 if good and good[0]["metric"] == "accuracy" else 1
    ax.errorbar([r["inner_steps"] for r in good], [r["score"] * scale for r in good],
                yerr=[r["ci95"] * scale for r in good], fmt="o-", capsize=3)
    ax.set_xlabel("inner steps at test time")
    metric = good[0]["metric"] if good else "accuracy"
    ax.set_ylabel(f"validation {metric}" + (" (%)" if scale == 100 else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# Flags left out of the heat map's title (long lists; the CSV's command has them).
UNTITLED = ("data_path", "train_groups", "val_groups", "test_groups", "exclude_groups")


def plot_title(base_args):
    """The heat map's title: the fm-train arguments but data paths and group lists."""
    kept = [a for a in base_args if a.lstrip("-").split("=", 1)[0] not in UNTITLED]
    return "fm-train " + " ".join(kept)


def sweep(grid, points, base_args, *, csv_path, plot_path, runs_dir, jobs, timeout,
          curve_steps, curve_episodes):
    """The whole accuracy sweep (see the module docstring); returns the number of failed points."""
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    names = [name for name, _ in grid]

    def describe(arguments, row):
        return f"{' '.join(f'--{k}={v}' for k, v in arguments[0].items())}: {_summary(row)}"
    rows = run_all(train_point, [(p, base_args, runs_dir, timeout) for p in points], jobs,
                   describe)
    write_csv(csv_path, rows, names)
    print(f"wrote {csv_path}")
    best = best_row(rows)
    if plot_path and best is not None and heat_map(rows, grid, plot_path, plot_title(base_args)):
        print(f"wrote {plot_path}")
    if best is not None:
        print(f"best: {' '.join(f'--{k}={best[k]}' for k in names)}: {_summary(best)}")
        config = json.loads(Path(best["run_dir"], "config.json").read_text())
        if config.get("family") == "maml" and curve_steps:
            checkpoint = str(Path(best["run_dir"], "checkpoints", f"ckpt-{best['val_step']}"))
            seed = int(config.get("seed", 0)) + 1          # fm-train's validation episodes
            jit = [a for a in base_args if a.split("=")[0] in ("--jit", "--nojit")]
            curve = run_all(curve_point, [(checkpoint, s, curve_episodes, seed, timeout, jit)
                                          for s in curve_steps], jobs,
                            lambda a, r: f"{a[1]} inner steps: {_summary(r)}")
            stem = str(Path(csv_path).with_suffix(""))
            write_csv(f"{stem}_inner_steps.csv", curve, CURVE_COLUMNS)
            print(f"wrote {stem}_inner_steps.csv")
            where = " ".join(f"{k}={best[k]}" for k in names)
            if plot_path and curve_plot(curve, f"{stem}_inner_steps.png", f"best cell: {where}"):
                print(f"wrote {stem}_inner_steps.png")
    return sum(bool(r["error"]) for r in rows)
