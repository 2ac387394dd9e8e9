"""Run a benchmark binary over a grid of flag values; write a CSV and a plot of throughput and
peak memory against the swept variables.

  fm-sweep --bench=maml --grid=inner_steps=1,2,5 --grid=meta_batch=8,16 \\
      --csv=/tmp/sweep.csv -- --preset=maml_omniglot_5way --steps=10

Flags after ``--`` go to every run. Values of a grid flag are separated by ',' or, when a value
itself holds commas, by ';' (``--grid='image_shape=28,28,1;56,56,1'``). Every point of the grid
(the product of all ``--grid`` flags) runs in its own subprocess,
``python -m benchmarks.<bench>_bench ... --json``, so the peak memory reported for a point is its
own process's. All points are parsed and validated before the first one runs. A point that fails
(out of memory, say) is recorded with its error and the sweep goes on.

The plot (matplotlib, optional: without it the plot is skipped) has the first grid flag on the x
axis and one line per combination of the others; top panel tasks/s, bottom panel peak memory.

``--bench=train`` sweeps accuracy instead (benchmarks.accuracy_sweep; the tutorial's exercise 2):
each point is a short fm-train run scored by its final validation with its 95% interval, ``--jobs``
of them at once; the CSV, a heat map of the score over the one or two swept flags, and for MAML
the best point's validation score after each of ``--curve_steps`` test-time inner steps:

  fm-sweep --bench=train --grid=inner_lr=0.1,0.4,1.0 --grid=outer_lr=3e-4,1e-3,3e-3 \\
      --csv=lr.csv -- --algorithm=maml --data=omniglot --data_path=... --steps=300 --val_every=300
"""

import csv
import itertools
import json
import os
import subprocess
import sys

from absl import app, flags, logging

from benchmarks import flag_groups

FLAGS = flags.FLAGS
flags.DEFINE_enum("bench", "maml", ["maml", "protonet", "train"], "Which benchmark binary to "
                  "run; train: fm-train runs scored by validation accuracy (an accuracy sweep).")
flags.DEFINE_multi_string("grid", None, "A swept flag and its values, NAME=V1,V2,... (or "
                          "NAME=V1;V2 when values hold commas); repeat for a product grid.")
flags.DEFINE_string("csv", "sweep.csv", "Where to write one row per grid point.")
flags.DEFINE_string("plot", None, "Where to write the PNG plot (default: the CSV path with "
                    ".png); an empty string skips it.")
flags.DEFINE_integer("timeout", 3600, "Seconds one grid point may run.", lower_bound=1)
flags.DEFINE_integer("jobs", 1, "--bench=train: grid points run at once (each its own process; "
                     "speed benchmarks always run one at a time).", lower_bound=1)
flags.DEFINE_string("runs_dir", None, "--bench=train: folder of the runs, one sub-folder per "
                    "point (a point whose folder holds checkpoints is resumed); default: the CSV "
                    "path without .csv, plus _runs.")
flags.DEFINE_list("curve_steps", ["1", "2", "3", "5", "10"], "--bench=train, MAML: test-time "
                  "inner steps at which the best point is scored on the validation classes "
                  "(empty: no curve).")
flags.DEFINE_integer("curve_episodes", 200, "--bench=train: validation episodes per point of the "
                     "inner-steps curve.", lower_bound=1)


@flags.validator("curve_steps", "--curve_steps: positive integers separated by commas")
def _check_curve_steps(value):
    return all(v.isdigit() and int(v) > 0 for v in value)
flags.mark_flag_as_required("grid")

COLUMNS = ("step_median_ms", "step_iqr_ms", "tasks_per_s", "first_call_s", "achieved_gflops",
           "matmul_gflops", "peak_memory_mib", "peak_memory_kind", "input_wait_median_ms",
           "input_wait_max_ms", "stalled", "mode", "device", "error")


def parse_grid(specs):
    """``['inner_steps=1,2', ...]`` -> ``[('inner_steps', ['1', '2']), ...]``."""
    grid = []
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip().lstrip("-")
        values = [v.strip() for v in values.split(";" if ";" in values else ",")]
        if not sep or not name or not all(values):
            raise ValueError(f"--grid={spec}: expected NAME=V1,V2,...")
        if name == "json" or name in dict(grid):
            raise ValueError(f"--grid={spec}: {name!r} cannot be swept or is swept twice")
        grid.append((name, values))
    return grid


def grid_points(grid):
    """Every combination of the grid's values, as dicts ``{name: value}``."""
    names = [name for name, _ in grid]
    return [dict(zip(names, values)) for values in itertools.product(*(v for _, v in grid))]


def _args(point):
    return [f"--{name}={value}" for name, value in point.items()]


def run_point(bench, base_args, point, timeout):
    """Run one grid point in a subprocess; its JSON record, or ``{'error': ...}``."""
    command = [sys.executable, "-m", f"benchmarks.{bench}_bench", *base_args, *_args(point),
               "--json"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return {"error": f"exit {done.returncode}: {lines[-1] if lines else ''}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def csv_row(point, record):
    """The CSV row of one point: the main numbers (blank on failure) and the swept values."""
    if "error" in record:
        return {**{c: "" for c in COLUMNS}, "error": record["error"], **point}
    step, wait = record["step_s"], record["input_wait_s"]  # None: fixed batch, no pipeline
    return {"step_median_ms": step["median"] * 1e3, "step_iqr_ms": step["iqr"] * 1e3,
            "tasks_per_s": record["tasks_per_s"], "first_call_s": record["first_call_s"],
            "achieved_gflops": record["achieved_flops_per_s"] / 1e9,
            "matmul_gflops": record["matmul_flops_per_s"] / 1e9,
            "peak_memory_mib": record["peak_memory_bytes"] / 2 ** 20,
            "peak_memory_kind": record["peak_memory_kind"],
            "input_wait_median_ms": wait["median"] * 1e3 if wait else "",
            "input_wait_max_ms": wait["max"] * 1e3 if wait else "", "stalled": record["stalled"],
            "mode": record["mode"], "device": record["device"], "error": "", **point}


def plot(rows, grid, path):
    """Writes ``figure`` for ``--bench`` to the PNG ``path``; ``False`` without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'functional_meta[plot]'): no plot")
        return False
    fig = figure(rows, grid, FLAGS.bench)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def figure(rows, grid, bench):
    """Throughput and peak memory against the first grid flag, one line per combination of the
    others (a matplotlib ``Figure``). Throughput is tasks/s for MAML and episodes/s for ProtoNet,
    the unit each benchmark reports (``report.throughput``)."""
    import matplotlib.pyplot as plt
    x_name, x_values = grid[0]
    others = [name for name, _ in grid[1:]]
    numeric = all(v.lstrip("-").replace(".", "", 1).isdigit() for v in x_values)
    position = {v: float(v) if numeric else i for i, v in enumerate(x_values)}
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(6, 6))
    lines = {}
    for row in rows:
        if not row["error"]:
            key = ", ".join(f"{n}={row[n]}" for n in others) or bench
            lines.setdefault(key, []).append(row)
    for key, line in lines.items():
        xs = [position[r[x_name]] for r in line]
        top.plot(xs, [r["tasks_per_s"] for r in line], "o-", label=key)
        bottom.plot(xs, [r["peak_memory_mib"] for r in line], "o-", label=key)
    top.set_ylabel("episodes / s" if bench == "protonet" else "tasks / s")
    kinds = sorted({r["peak_memory_kind"] for r in rows if not r["error"]})
    bottom.set_ylabel(f"peak memory, MiB ({', '.join(kinds)})")
    bottom.set_xlabel(x_name)
    if not numeric:
        bottom.set_xticks(list(position.values()), list(position))
    top.legend(fontsize="small")
    top.set_title(f"{bench} sweep")
    fig.tight_layout()
    return fig


def main(argv):
    base_args = argv[1:]
    try:
        grid = parse_grid(FLAGS.grid)
    except ValueError as e:
        raise app.UsageError(str(e))
    points = grid_points(grid)
    if FLAGS.bench == "train":
        return _accuracy_sweep(grid, points, base_args)
    if FLAGS.jobs != 1:
        raise app.UsageError("--jobs: speed benchmarks run one at a time (they would time each "
                             "other); --jobs is for --bench=train")
    for point in points:  # every point's flags are valid before anything runs
        try:
            flag_groups.parse_flags(FLAGS.bench, [*base_args, *_args(point)])
        except flags.Error as e:
            raise app.UsageError(f"grid point {' '.join(_args(point))}: {e}")
    rows = []
    for i, point in enumerate(points, 1):
        logging.info("running %s", " ".join(_args(point)))
        record = run_point(FLAGS.bench, base_args, point, FLAGS.timeout)
        rows.append(csv_row(point, record))
        r = rows[-1]
        summary = (r["error"] or f"{r['step_median_ms']:.2f} ms/step, {r['tasks_per_s']:.1f} "
                   f"tasks/s, {r['peak_memory_mib']:.0f} MiB peak")
        print(f"[{i}/{len(points)}] {' '.join(_args(point))}: {summary}", flush=True)
    with open(FLAGS.csv, "w", newline="") as f:
        names = [name for name, _ in grid]
        writer = csv.DictWriter(f, fieldnames=names + [c for c in COLUMNS if c not in names])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {FLAGS.csv}")
    plot_path = os.path.splitext(FLAGS.csv)[0] + ".png" if FLAGS.plot is None else FLAGS.plot
    if plot_path and plot(rows, grid, plot_path):
        print(f"wrote {plot_path}")
    failed = sum(bool(r["error"]) for r in rows)
    if failed:
        print(f"{failed} of {len(rows)} points failed")
    if failed == len(rows):
        sys.exit(1)


def _accuracy_sweep(grid, points, base_args):
    from benchmarks import accuracy_sweep
    try:
        accuracy_sweep.check(grid, base_args)
    except ValueError as e:
        raise app.UsageError(str(e))
    plot_path = os.path.splitext(FLAGS.csv)[0] + ".png" if FLAGS.plot is None else FLAGS.plot
    runs_dir = FLAGS.runs_dir or os.path.splitext(FLAGS.csv)[0] + "_runs"
    failed = accuracy_sweep.sweep(
        grid, points, base_args, csv_path=FLAGS.csv, plot_path=plot_path, runs_dir=runs_dir,
        jobs=FLAGS.jobs, timeout=FLAGS.timeout, curve_steps=[int(s) for s in FLAGS.curve_steps],
        curve_episodes=FLAGS.curve_episodes)
    if failed:
        print(f"{failed} of {len(points)} points failed")
    if failed == len(points):
        sys.exit(1)


def run():
    flag_groups.run_binary(main, __name__)


if __name__ == "__main__":
    run()
