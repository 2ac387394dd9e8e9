"""docs/data/inner_loops.png from inner_loops_scaling.csv and imaml_study.csv (docs/inner_loops.md).

  python docs/data/plot_inner_loops.py
"""

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent


def rows(name):
    with open(HERE / name, newline="") as f:
        return list(csv.DictReader(f))


def main():
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    scaling = rows("inner_loops_scaling.csv")
    for mode, marker in (("unrolled", "o"), ("looped", "s")):
        for load, fill in (("loaded", "full"), ("quiet", "none")):
            points = [(int(r["inner_steps"]), float(r["ratio_to_1_step"])) for r in scaling
                      if r["run"].startswith(mode) and r["machine_load"].startswith(load)]
            left.plot(*zip(*points), marker, fillstyle=fill, label=f"{mode}, {load} machine")
    top = max(int(r["inner_steps"]) for r in scaling)
    left.plot([1, top], [1, top], "k:", label="inner steps x the 1-step time")
    left.set(xscale="log", yscale="log", xlabel="inner steps",
             ylabel="step time / 1-step time", title="Config A, exact second order")
    left.legend()
    study = rows("imaml_study.csv")
    last = max(int(r["step"]) for r in study)
    for step, style in ((1, "o-"), (last, "s-")):
        points = sorted((int(r["inner_steps"]), float(r["cosine"]), float(r["relative_error"]))
                        for r in study if int(r["step"]) == step)
        steps, cosines, errors = zip(*points)
        right.plot(steps, cosines, style, label=f"cosine, training step {step}")
        right.plot(steps, errors, style, alpha=0.5, label=f"relative error, training step {step}")
    right.set(xscale="log", xlabel="inner steps", title="iMAML against the exact meta-gradient")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "inner_loops.png", dpi=120)


if __name__ == "__main__":
    main()
