"""Draw the figures of docs/performance.md from the CSV files beside this script.

    pip install -e '.[plot]' && python docs/data/plot.py

Writes vs_pytorch.png, vs_tf.png and memory.png into this folder. Every point is one measured
pair or run; a dashed line is the median of one machine's runs.
"""

import csv
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

HERE = os.path.dirname(os.path.abspath(__file__))
MACHINES = {"epyc-avx2": ("2-core AMD EPYC, AVX2", "tab:blue"),
            "epyc-avx512": ("2-core AMD EPYC, AVX-512", "tab:orange")}
VARIANT_MARKERS = {"concatenated": "x", "stacked": "s", "shared_first_step": "^",
                   "phase_windows": "D", "current": "o"}


def read(name):
    with open(os.path.join(HERE, name), newline="") as f:
        return list(csv.DictReader(f))


def by_machine(rows):
    """``(machine, rows)`` in MACHINES' order, each machine's rows in file order."""
    return [(m, [r for r in rows if r["machine"] == m]) for m in MACHINES
            if any(r["machine"] == m for r in rows)]


def pair_panels(axes, rows, rate_a, rate_b, unit, title):
    """Both sides' throughput (top) and their ratio (bottom) per pair, machines side by side."""
    top, bottom = axes
    start = 0
    for machine, mine in by_machine(rows):
        label, colour = MACHINES[machine]
        x = list(range(start + 1, start + len(mine) + 1))
        top.plot(x, [float(r[rate_a]) for r in mine], "o", color=colour, label=f"functional_meta, {label}")
        top.plot(x, [float(r[rate_b]) for r in mine], "v", color=colour, mfc="none",
                 label=f"PyTorch, {label}")
        ratios = [float(r["ratio"]) for r in mine]
        bottom.plot(x, ratios, "o", color=colour, label=label)
        median = statistics.median(ratios)
        bottom.hlines(median, x[0] - 0.4, x[-1] + 0.4, colors=colour, linestyles="dashed")
        bottom.annotate(f"median {median:.2f}x", (x[0], median), textcoords="offset points",
                        xytext=(0, -12), color=colour, fontsize=8)
        start += len(mine) + 2
    top.set_yscale("log")
    top.set_ylabel(unit)
    top.set_title(title)
    top.legend(fontsize=7)
    bottom.set_ylabel("speedup (ratio of median step times)")
    bottom.set_xlabel("pair, back to back (machines side by side)")
    bottom.set_ylim(bottom=0)
    bottom.axhline(1.0, color="grey", linewidth=0.8)


def plot_vs_pytorch():
    maml = [r for r in read("maml_vs_pytorch.csv") if r["preset"] == "maml_omniglot_5way"]
    proto = [r for r in read("protonet_vs_pytorch.csv") if r["episodes"] == "5-way 1-shot 15-query"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex="col")
    pair_panels(axes[:, 0], maml, "functional_meta_tasks_per_s", "pytorch_tasks_per_s", "tasks/s",
                "MAML config A (maml_omniglot_5way) against PyTorch")
    pair_panels(axes[:, 1], proto, "functional_meta_episodes_per_s", "pytorch_episodes_per_s",
                "episodes/s", "ProtoNet 5-way 1-shot 15-query against PyTorch")
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "vs_pytorch.png"), dpi=110)
    plt.close(fig)


def plot_vs_tf():
    interleaved = [r for r in read("maml_vs_tf_interleaved.csv") if r["preset"] == "maml_omniglot_5way"]
    sequential = [r for r in read("maml_vs_tf_sequential.csv")
                  if r["preset"] == "maml_omniglot_5way" and r["mode"] == "xla" and r["ratio"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, rows, column, title in (
            (axes[0], interleaved, "speedup", "interleaved in one process (fm-tf-reference --interleaved)"),
            (axes[1], sequential, "ratio", "separate processes, one after another (fm-tf-reference)")):
        start = 0
        for machine, mine in by_machine(rows):
            label, colour = MACHINES[machine]
            for variant, marker in VARIANT_MARKERS.items():
                points = [(start + i + 1, float(r[column])) for i, r in enumerate(mine)
                          if r["library_variant"] == variant]
                if points:
                    ax.plot(*zip(*points), marker, color=colour, mfc="none" if variant != "current" else colour,
                            label=f"{label}, {variant.replace('_', ' ')}")
            start += len(mine) + 2
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("run (machines side by side)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("speedup (ratio of median step times)")
    axes[0].set_ylim(bottom=0)
    fig.suptitle("MAML config A (maml_omniglot_5way) against the straightforward TensorFlow step under XLA")
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "vs_tf.png"), dpi=110)
    plt.close(fig)


def plot_memory():
    rows = [r for r in read("maml_memory.csv") if r["machine"] == "epyc-avx512"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for chunk, recompute, style in (("8", "0", "o-"), ("8", "1", "o--"), ("32", "0", "s-"), ("32", "1", "s--")):
        mine = [r for r in rows if r["task_chunk"] == chunk and r["recompute"] == recompute]
        label = ("chunks of 8" if chunk == "8" else "whole meta-batch") + (", --recompute" if recompute == "1" else "")
        ax.plot([int(r["inner_steps"]) for r in mine], [float(r["peak_temp_mib"]) for r in mine], style, label=label)
    ax.set_xlabel("inner steps")
    ax.set_ylabel("peak temporary memory of the step (MiB)")
    ax.set_title("config A under XLA, 2-core AMD EPYC, AVX-512", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "memory.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    plot_vs_pytorch()
    plot_vs_tf()
    plot_memory()
