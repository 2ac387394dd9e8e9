"""Unrolled against looped MAML inner loops, side by side in one process (maml.inner_loop).

For each --inner_steps value, builds a preset's compiled train step twice (inner_loop='unrolled'
and 'looped'), times each first call (trace + compile + run), then interleaves the timed steps
(runner.time_interleaved) so that the machine's drift hits both alike. Prints one row per step
count and appends them to --output (CSV). Example:

  python -m benchmarks.inner_loop_ab --preset=maml_omniglot_5way --inner_steps=2,3,5 --steps=12

With --runs (MODE:STEPS items) it instead interleaves all of those steps in one process, one call
at a time, and reports each against the first (the cost per inner step):

  python -m benchmarks.inner_loop_ab --runs=unrolled:1,looped:10,looped:40 --steps=4 --warmup=1
"""

import os

from absl import app, flags

from benchmarks import flag_groups

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "maml_omniglot_5way", "MAML preset to build the step from.")
flags.DEFINE_list("inner_steps", ["2", "3", "5"], "Inner-step counts to compare.")
flags.DEFINE_list("modes", ["unrolled", "looped"], "inner_loop values to compare.")
flags.DEFINE_integer("steps", 12, "Timed calls of each step.", lower_bound=1)
flags.DEFINE_integer("warmup", 2, "Untimed calls (the first included) of each step.",
                     lower_bound=1)
flags.DEFINE_list("runs", [], "MODE:STEPS items (e.g. unrolled:1,looped:40) to time against "
                  "each other in one process instead of the --inner_steps pairs.")
flags.DEFINE_string("output", None, "Append the rows to this CSV file.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import tensorflow as tf

    from benchmarks import report, runner
    from functional_meta import maml, presets, training

    def build(mode, inner_steps):
        config = presets.get(FLAGS.preset, inner_steps=inner_steps)
        init, apply = presets.network(config)
        step = maml.make_train_step(apply, inner_steps=inner_steps, outer_lr=config["outer_lr"],
                                    loss=config["loss"],
                                    task_chunk=training.default_task_chunk(config),
                                    inner_loop=mode)
        state = maml.init_state(init(0), config["inner_lr"])
        return (step, state), runner.synthetic_batch(config, 0)

    if FLAGS.runs:
        runs, batch = {}, None
        for item in FLAGS.runs:
            mode, steps = item.split(":")
            runs[item], batch = build(mode, int(steps))
        timing = runner.time_interleaved(runs, lambda: batch, FLAGS.steps, FLAGS.warmup,
                                         per_round=1)
        base = timing[FLAGS.runs[0]]["step_s"]["median"]
        for item, t in timing.items():
            steps = int(item.split(":")[1])
            ratio = t["step_s"]["median"] / base
            print(f"{item:14s} first call {t['first_call_s']:7.2f} s  step "
                  f"{t['step_s']['median'] * 1e3:9.1f} ms (min {t['step_s']['min'] * 1e3:.1f})  "
                  f"x{ratio:.2f} the first, x{ratio / steps:.2f} per inner step", flush=True)
        return

    rows = []
    for inner_steps in [int(k) for k in FLAGS.inner_steps]:
        runs = {}
        for mode in FLAGS.modes:
            runs[mode], batch = build(mode, inner_steps)
        timing = runner.time_interleaved(runs, lambda: batch, FLAGS.steps, FLAGS.warmup)
        for mode in FLAGS.modes:
            t = timing[mode]
            rows.append({"preset": FLAGS.preset, "inner_steps": inner_steps, "inner_loop": mode,
                         "first_call_s": round(t["first_call_s"], 2),
                         "step_median_s": round(t["step_s"]["median"], 4),
                         "step_min_s": round(t["step_s"]["min"], 4),
                         "step_max_s": round(t["step_s"]["max"], 4),
                         "loss": round(t["loss"], 6), "tf_version": tf.__version__,
                         "cpus": os.cpu_count()})
        base = timing[FLAGS.modes[0]]["step_s"]["median"]
        for row in rows[-len(FLAGS.modes):]:
            print(f"{FLAGS.preset} inner_steps={inner_steps:3d} {row['inner_loop']:9s} first call "
                  f"{row['first_call_s']:7.2f} s  step {row['step_median_s'] * 1e3:8.1f} ms "
                  f"(min {row['step_min_s'] * 1e3:.1f}, max {row['step_max_s'] * 1e3:.1f})  "
                  f"x{row['step_median_s'] / base:.3f}", flush=True)
        if FLAGS.output:
            report.append_csv(FLAGS.output, rows[-len(FLAGS.modes):])


def run():
    flag_groups.run_binary(main, __name__)


if __name__ == "__main__":
    run()
