"""Draw the figures of docs/domains.md from domains_omniglot.csv beside this script.

    pip install -e '.[plot]' && python docs/data/plot_domains.py [OMNIGLOT_ZIP]

Writes domains_accuracy_5way.png and domains_accuracy_20way.png (accuracy per target domain per
training regime and seed, 95% intervals) and, given the small2 zip, domains_examples.png (the same
held-out characters in every domain of the experiment).
"""

import csv
import os
import sys

from functional_meta import domains

HERE = os.path.dirname(os.path.abspath(__file__))
DOMAINS = ["clean", "rotate:45", "dilate:1", "blur:1", "noise:0.3", "elastic:34:4", "dilate:2",
           "noise:0.5", "invert"]
TEST_ALPHABETS = ["Japanese_(katakana)", "Sanskrit", "Tagalog"]


def main(argv):
    with open(os.path.join(HERE, "domains_omniglot.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    for way in sorted({r["n_way"] for r in rows}, key=int):
        mine = [dict(r, method=f"{r['training']}, seed {r['seed']}") for r in rows
                if r["n_way"] == way]
        print(domains.plot_accuracy(mine, os.path.join(HERE, f"domains_accuracy_{way}way.png"),
                                    title=f"ProtoNet, held-out alphabets, {way}-way 1-shot"))
    if len(argv) > 1:
        from functional_meta import data
        test = data.select_groups(data.omniglot_zip(argv[1]), TEST_ALPHABETS)
        print(domains.plot_examples(test, DOMAINS, os.path.join(HERE, "domains_examples.png")))


if __name__ == "__main__":
    main(sys.argv)
