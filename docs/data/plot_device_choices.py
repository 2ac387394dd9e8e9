"""docs/data/device_choices.png from device_choices.csv (docs/design.md, device choices): config A's
step time with each device choice changed, over the CPU settings', on a CPU.

  python docs/data/plot_device_choices.py
"""

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
LABELS = {"grouped_conv": "grouped convolutions\n(GPU form)", "gpu": "every GPU choice",
          "no_barrier": "no kernel-gradient\nbarrier (GPU)",
          "whole_batch": "whole meta-batch\n(GPU)", "bfloat16": "bfloat16 products\n(option)"}


def main():
    with open(HERE / "device_choices.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["variant"] != "base"]
    variants = list(LABELS)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for r in rows:
        x = variants.index(r["variant"])
        ax.plot(x, float(r["ratio"]), "o", color=f"C{int(r['run']) - 1}")
    for run in sorted({r["run"] for r in rows}):
        ax.plot([], [], "o", color=f"C{int(run) - 1}", label=f"run {run}")
    ax.axhline(1.0, color="k", linestyle=":", label="CPU settings")
    ax.set(yscale="log", ylabel="step time / CPU settings' step time",
           title="Config A under XLA on a 2-core AMD EPYC (AVX-512), load 13-15: a CPU figure,\n"
                 "not a GPU one")
    ax.set_xticks(range(len(variants)), [LABELS[v] for v in variants], fontsize=8)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(HERE / "device_choices.png", dpi=120)


if __name__ == "__main__":
    main()
