"""docs/data/mann_by_instance.png from mann_by_instance.csv (docs/mann.md): accuracy against the
instance number of a class on the unseen alphabets for each model named in ``SHOWN``
(``functional_meta.plots.accuracy_by_instance``, as ``fm-eval --plot_instances``), with Santoro
et al. (2016) Table 1's MANN and LSTM rows as markers.

  python docs/data/plot_mann_by_instance.py
"""

import csv
from pathlib import Path

from functional_meta import plots

HERE = Path(__file__).parent
# The runs drawn (the CSV holds more: their earlier checkpoints).
SHOWN = ("class-mean rule on the frozen ProtoNet features",
         "mann with weight decay 0.1 seed 1 (step 10000)",
         "ensemble of 3 seeds of the heads-reading mann (step 10000)",
         "mann with heads reading the frozen features (step 10000)",
         "mann with frozen ProtoNet features alone (step 4000)",
         "mann with encoder (step 12000)", "mann with augmentation (step 12000)",
         "lstm with frozen ProtoNet features alone (step 4000)",
         "lstm with encoder (step 8000)", "lstm (step 12000)")
# Santoro et al. (2016), Table 1, 5 classes, one-hot labels: instance -> accuracy.
PAPER = {"MANN, Santoro et al.": {1: .364, 2: .828, 3: .910, 4: .926, 5: .949, 10: .981},
         "LSTM, Santoro et al.": {1: .244, 2: .495, 3: .553, 4: .610, 5: .636, 10: .625}}


def main():
    rows = {}
    with open(HERE / "mann_by_instance.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r["model"] in SHOWN:
                rows.setdefault(r["model"], []).append(
                    (int(r["instance"]), float(r["accuracy"]), float(r["ci95"])))
    curves = {name: tuple(zip(*sorted(rows[name])))[1:] for name in SHOWN if name in rows}
    plots.accuracy_by_instance(curves, HERE / "mann_by_instance.png", references=PAPER,
                               title="Unseen alphabets (small2), 5 classes x 10 instances")


if __name__ == "__main__":
    main()
