"""docs/data/mann_by_instance.png from mann_by_instance.csv (docs/mann.md): accuracy against the
instance number of a class on the unseen alphabets, one line with its 95% band per model named
in ``SHOWN``, and Santoro et al. (2016) Table 1's MANN and LSTM rows as markers.

  python docs/data/plot_mann_by_instance.py
"""

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
# The runs drawn (the CSV holds more: their earlier checkpoints).
SHOWN = ("mann with frozen ProtoNet features alone (step 4000)",
         "mann with encoder (step 12000)", "mann with augmentation (step 12000)",
         "lstm with frozen ProtoNet features alone (step 4000)",
         "lstm with encoder (step 8000)", "lstm (step 12000)")
# Santoro et al. (2016), Table 1, 5 classes, one-hot labels: instance -> accuracy (%).
PAPER = {"MANN, Santoro et al.": {1: 36.4, 2: 82.8, 3: 91.0, 4: 92.6, 5: 94.9, 10: 98.1},
         "LSTM, Santoro et al.": {1: 24.4, 2: 49.5, 3: 55.3, 4: 61.0, 5: 63.6, 10: 62.5}}


def main():
    curves = {}
    with open(HERE / "mann_by_instance.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r["model"] in SHOWN:
                curves.setdefault(r["model"], []).append(
                    (int(r["instance"]), 100 * float(r["accuracy"]), 100 * float(r["ci95"])))
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, name in enumerate(n for n in SHOWN if n in curves):
        k, mean, ci = zip(*sorted(curves[name]))
        ax.plot(k, mean, "o-", color=f"C{i}", label=name, markersize=4)
        ax.fill_between(k, [m - c for m, c in zip(mean, ci)], [m + c for m, c in zip(mean, ci)],
                        color=f"C{i}", alpha=0.2)
    for marker, (name, row) in zip("*x", PAPER.items()):
        ax.plot(list(row), list(row.values()), marker, color="k", markersize=8, label=name)
    ax.set(xlabel="instance of a class in its sequence", ylabel="accuracy (%)", ylim=(0, 100),
           xticks=range(1, 11),
           title="Unseen alphabets (small2), 5 classes x 10 instances")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(HERE / "mann_by_instance.png", dpi=120)


if __name__ == "__main__":
    main()
