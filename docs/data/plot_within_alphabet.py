"""docs/data/within_alphabet.png from within_alphabet.csv (docs/accuracy.md, within-alphabet
episodes): each model's and evaluation option's within-alphabet 20-way 1-shot accuracy with its
95% interval, beside the study's aim (the baseline's error cut by a third).

  python docs/data/plot_within_alphabet.py
"""

import csv
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
WITHIN = "20-way 1-shot within alphabet"
# The reference: today's best recipe (the *all* recipe, 16000 steps), scored the same way.
REFERENCE = "all recipe 16k"


def label(r):
    parts = [r["model"], f"{r['bn']} batch norm"]
    if r["tta_views"] != "1":
        parts.append(f"{r['tta_views']} views" + (" of support and queries"
                                                  if r["tta_queries"] == "1" else ""))
    if r["transductive_steps"] != "0":
        parts.append(f"refined {r['transductive_steps']}x by the queries (transductive)")
    if r["finetune_steps"] != "0":
        parts.append(f"fine-tuned {r['finetune_steps']} steps at {r['finetune_lr']}")
    if r["episodes"] != "600":
        parts.append(f"{r['episodes']} episodes")
    return ", ".join(parts)


def main():
    with open(HERE / "within_alphabet.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["eval"] == WITHIN]
    models = list(dict.fromkeys(r["model"] for r in rows))
    rows.sort(key=lambda r: models.index(r["model"]))      # each model's rows together
    fig, ax = plt.subplots(figsize=(11, 0.4 * len(rows) + 1.2))
    for y, r in enumerate(rows):
        acc, ci = 100 * float(r["accuracy"]), 100 * float(r["ci95"])
        ax.errorbar(acc, y, xerr=ci, fmt="o", capsize=3, color=f"C{models.index(r['model'])}")
    plain = dict(bn="transductive", tta_views="1", transductive_steps="0")
    refined = dict(bn="support", tta_views="5", tta_queries="1", transductive_steps="10")
    right = max(100 * (float(r["accuracy"]) + float(r["ci95"])) for r in rows) + 1
    for model, name, style, options in (
            ("baseline", "the 4000-step baseline's", ":", plain),
            (REFERENCE, "today's best recipe's (16000 steps)", "--", plain),
            (REFERENCE, "that recipe's refined the same way", "-.", refined)):
        base = next(r for r in rows if r["model"] == model
                    and all(r[k] == v for k, v in options.items()))
        aim = 100 - (100 - 100 * float(base["accuracy"])) * 2 / 3
        right = max(right, aim + 1)
        ax.axvline(aim, color="k", linestyle=style,
                   label=f"aim: {name} error cut by a third ({aim:.1f}%)")
    ax.set_yticks(range(len(rows)), [textwrap.fill(label(r), 70) for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="accuracy (%), 95% interval",
           title="Within-alphabet 20-way 1-shot on the held-out small2 alphabets\n"
                 "(ProtoNet trained on small1, 4000 steps unless 16k)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.5 / len(rows) - 0.12), fontsize=8)
    ax.set_xlim(right=right)
    fig.tight_layout()
    fig.savefig(HERE / "within_alphabet.png", dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
