"""A MAML preset's compiled step with each device choice changed, side by side in one process.

Each variant is the step traced for this machine's device with some of ``functional_meta.devices``'
choices changed (or for the other kind of device, or with bfloat16 products). Every variant makes
its first call (trace + compile + run), then all take turns one call at a time
(runner.time_interleaved), so that the machine's drift hits them alike. Prints one row per variant
against the first and appends them to --output (CSV). On a CPU the GPU variants measure what a GPU
choice costs on a CPU, not what it gains on a GPU. Example:

  python -m benchmarks.device_ab --variants=base,no_barrier,whole_batch,bfloat16 --steps=15
"""

import os
import time

from absl import app, flags

import benchmarks

FLAGS = flags.FLAGS
# Variant name -> (target kind or None for this machine's, choices changed, precision).
VARIANTS = {
    "base": (None, {}, "float32"),
    "grouped_conv": (None, {"patches": False}, "float32"),
    "no_barrier": (None, {"kernel_barrier": False}, "float32"),
    "whole_batch": (None, {"task_chunks": False}, "float32"),
    "bfloat16": (None, {}, "bfloat16"),
    "cpu": ("cpu", {}, "float32"),
    "gpu": ("gpu", {}, "float32"),
}
flags.DEFINE_string("preset", "maml_omniglot_5way", "MAML preset to build the step from.")
flags.DEFINE_list("variants", ["base", "no_barrier", "whole_batch", "bfloat16"],
                  "Variants to time, the first the reference: base (this machine's choices), "
                  "grouped_conv (per-task convolutions as one grouped convolution), no_barrier "
                  "(plain kernel gradients), whole_batch (no task chunks), bfloat16 (bfloat16 "
                  "product inputs), cpu / gpu (every choice of that kind of device).")
flags.DEFINE_integer("steps", 15, "Timed calls of each variant.", lower_bound=1)
flags.DEFINE_integer("warmup", 1, "Untimed calls (the first included) of each variant.",
                     lower_bound=1)
flags.DEFINE_string("output", None, "Append the rows to this CSV file.")
flags.register_validator("variants", lambda names: bool(names) and set(names) <= set(VARIANTS),
                         f"--variants must be some of {sorted(VARIANTS)}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    tf = benchmarks.start_tensorflow()
    from benchmarks import report, runner
    from functional_meta import devices, maml, presets, training

    config = presets.get(FLAGS.preset)
    if config["family"] != "maml":
        raise app.UsageError(f"--preset={FLAGS.preset} is not a MAML preset")
    init, apply = presets.network(config)
    batch = tuple(tf.constant(a) for a in runner.synthetic_batch(config, 0))
    runs, settings, first = {}, {}, {}
    for name in FLAGS.variants:
        kind, changes, precision = VARIANTS[name]
        kind = kind or devices.kind()
        with devices.target(kind), devices.changed(**changes), devices.precision(precision):
            chunk = training.default_task_chunk(config)
            step = maml.make_train_step(apply, inner_steps=config["inner_steps"],
                                        outer_lr=config["outer_lr"], loss=config["loss"],
                                        task_chunk=chunk)
            state = maml.init_state(init(0), config["inner_lr"])
            # The first call traces inside these blocks; later calls reuse that trace.
            start = time.perf_counter()
            state, metrics = step(state, batch)
            float(metrics["loss"])
            first[name] = time.perf_counter() - start
            settings[name] = (kind, devices.choices(), precision, chunk)
        runs[name] = (step, state)
    timing = runner.time_interleaved(runs, lambda: batch, FLAGS.steps, FLAGS.warmup, per_round=1)
    base = timing[FLAGS.variants[0]]["step_s"]["median"]
    load = os.getloadavg()[0]
    rows = []
    for name in FLAGS.variants:
        kind, choices, precision, chunk = settings[name]
        t = timing[name]
        rows.append({"preset": FLAGS.preset, "variant": name, "target": kind,
                     **choices._asdict(), "precision": precision, "task_chunk": chunk,
                     "first_call_s": round(first[name], 2),
                     "step_ms": round(t["step_s"]["median"] * 1e3, 1),
                     "min_ms": round(t["step_s"]["min"] * 1e3, 1),
                     "ratio": round(t["step_s"]["median"] / base, 3), "load": round(load, 1),
                     "device": runner.device_name(devices.kind())})
        print(", ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    if FLAGS.output:
        report.append_csv(FLAGS.output, rows)


if __name__ == "__main__":
    app.run(main)
