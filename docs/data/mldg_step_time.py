"""Time the MLDG and ERM steps of the rotated_mnist preset side by side in one process.

    python docs/data/mldg_step_time.py

Five training domains of 64 generated 28x28 images each per step (the step time does not depend
on the pixels), conv4-64 under XLA; the first call (trace, compile, run) apart, then six rounds
of five steps each, the two algorithms alternating. Prints each one's first call and the median,
min and max step time.
"""

import time

import numpy as np

from functional_meta import configs, data, domains, training

DOMAINS = ["rotate:0", "rotate:15", "rotate:30", "rotate:60", "rotate:75"]


def main():
    base = data.synthetic(10, 400, (28, 28, 1), seed=0)
    runs = {}
    for algorithm in ("erm", "mldg"):
        config = configs.make_config(algorithm, data="synthetic", domains=DOMAINS)
        train, _, _ = training.domain_splits(config, data=base)
        sampler = domains.DomainBatchSampler(train, config["batch_size"], 0)
        learner = training.make_learner(config)
        start = time.perf_counter()
        state, metrics = learner.step(learner.init(0), sampler.batch(0))
        float(metrics["loss"])
        runs[algorithm] = dict(learner=learner, state=state, sampler=sampler, steps=[],
                               first=time.perf_counter() - start)
    for index in range(1, 7):
        for run in runs.values():
            batch = run["sampler"].batch(index)
            for _ in range(5):
                start = time.perf_counter()
                run["state"], metrics = run["learner"].step(run["state"], batch)
                float(metrics["loss"])
                run["steps"].append(time.perf_counter() - start)
    for algorithm, run in runs.items():
        steps = 1e3 * np.array(run["steps"])
        print(f"{algorithm}: first call {run['first']:.2f} s, step median {np.median(steps):.1f} "
              f"ms (min {steps.min():.1f}, max {steps.max():.1f}, {len(steps)} steps)")
    print(f"MLDG / ERM: {np.median(runs['mldg']['steps']) / np.median(runs['erm']['steps']):.2f}")


if __name__ == "__main__":
    main()
