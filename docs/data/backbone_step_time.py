"""Time ProtoNet training steps of the backbones side by side in one process.

    python docs/data/backbone_step_time.py [--rounds=3] [--per_round=2] [--csv=out.csv]

20-way 1-shot 5-query episodes of 28x28x1 images (one per step, generated: the step time does not
depend on the pixels), Adam, float32: conv4 (max pooling) with 64 and 128 filters and ResNet-12
at its published widths (64-160-320-640) and at half of them (32-80-160-320), each compiled
without XLA (tf.function, oneDNN kernels) and with it. Every step's first call (trace, compile,
run) is timed apart; then ``--rounds`` rounds in which every step runs ``--per_round`` times in
turn, so all of them meet the same load. Prints, and writes as CSV, each one's first call, median,
min and max step time and its analytic FLOPs (functional_meta.flops).
"""

import argparse
import csv
import time

import numpy as np

import benchmarks                          # the binaries' process settings (oneDNN, XLA flags)
from benchmarks import runner
from functional_meta import flops, presets

BACKBONES = [("conv4", 64), ("conv4", 128), ("resnet12", 64), ("resnet12", 32)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per_round", type=int, default=2)
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    benchmarks.start_tensorflow()
    from functional_meta import protonet
    runs = []
    for net, channels in BACKBONES:
        config = presets.get("protonet_omniglot", net=net, channels=channels, n_way=20, k_shot=1,
                             q_query=5)
        init, apply = presets.network(config)
        batch = runner.synthetic_batch(config, 0)
        for xla in (False, True):
            step = protonet.make_train_step(apply, 20, jit_compile=xla)
            start = time.perf_counter()
            state, metrics = step(protonet.init_state(init(0)), batch)
            float(metrics["loss"])
            runs.append(dict(net=net, channels=channels, xla=xla, step=step, state=state,
                             batch=batch, first=time.perf_counter() - start, times=[],
                             flops=flops.protonet_step(config)))
            print(f"{net}-{channels} xla={xla}: first call {runs[-1]['first']:.1f} s", flush=True)
    for _ in range(args.rounds):
        for run in runs:
            for _ in range(args.per_round):
                start = time.perf_counter()
                run["state"], metrics = run["step"](run["state"], run["batch"])
                float(metrics["loss"])
                run["times"].append(time.perf_counter() - start)
    rows = []
    for run in runs:
        times = 1e3 * np.array(run["times"])
        rows.append(dict(backbone=f"{run['net']}-{run['channels']}",
                         widths="-".join(map(str, presets.resnet12_widths(run["channels"])))
                         if run["net"] == "resnet12" else str(run["channels"]),
                         mode="xla" if run["xla"] else "function",
                         first_call_s=round(run["first"], 2),
                         step_median_ms=round(float(np.median(times)), 1),
                         step_min_ms=round(float(times.min()), 1),
                         step_max_ms=round(float(times.max()), 1), steps=len(times),
                         gflops_per_step=round(run["flops"] / 1e9, 2)))
        print(", ".join(f"{k}={v}" for k, v in rows[-1].items()))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
