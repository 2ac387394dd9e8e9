"""Benchmark one training step of the memory-augmented network (MANN) or its LSTM baseline:
first call, step time, training episodes/s, peak memory.

The step is ``mann.make_train_step``'s (the whole sequence, backpropagation through time and the
Adam update in one ``tf.function``), on one random batch of label-offset sequences with the
preset's shapes (pure step time, no input pipeline), from the library's initial weights.
Examples:

  fm-mann-bench                                   # MANN, mann_omniglot_5way (50 steps, batch 16)
  fm-mann-bench --algorithm=lstm --json
  fm-mann-bench --interleaved --steps=30          # XLA against no XLA, in alternating rounds
  fm-mann-bench --encoder_channels=32             # with fm-train --backbone=conv4's encoder
"""

from absl import app, flags

import benchmarks
from benchmarks import flag_groups

FLAGS = flags.FLAGS
SEQUENCE_PRESETS = ("mann_omniglot_5way", "mann_omniglot_15way")


def define_flags():
    """The binary's flags, defined when it runs (the tests import the binaries side by side)."""
    flags.DEFINE_enum("algorithm", "mann", ["mann", "lstm"], "mann: LSTM controller with LRUA "
                      "memory; lstm: the baseline without memory.")
    flags.DEFINE_enum("preset", "mann_omniglot_5way", list(SEQUENCE_PRESETS),
                      "Sequence preset: 5 or 15 classes x 10 instances of 20x20 images.")
    flags.DEFINE_integer("meta_batch", None, "Sequences (episodes) per step; default: the "
                         "preset's (16).", lower_bound=1)
    flags.DEFINE_enum("mode", None, ["xla", "function"], "xla: tf.function(jit_compile=True); "
                      "function: tf.function without XLA. Default: the library's choice "
                      "(training.default_jit: function on CPU, xla on GPU).")
    flags.DEFINE_bool("interleaved", False, "Compile the step both with and without XLA and time "
                      "them in alternating rounds, so the machine's drift hits both alike; prints "
                      "both rows and the ratio of the median step times.")
    flags.DEFINE_integer("seed", 0, "Seed of the initial weights and the random batch.",
                         lower_bound=0)
    flags.DEFINE_integer("encoder_channels", 0, "Filters per block of the convolutional encoder "
                         "whose features the controller reads beside the pixels (fm-train "
                         "--backbone=conv4 --channels=C); 0: the pixels alone, as the paper.",
                         lower_bound=0)
    flag_groups.define_benchmark_flags()


def random_batch(config, seed):
    """One batch of the preset's shapes: uniform images, each sequence a random order of
    ``k_shot`` instances of ``n_way`` labels, the label input one step late."""
    import numpy as np
    from functional_meta import sequences
    rng = np.random.default_rng(seed)
    b, n, k = config["meta_batch"], config["n_way"], config["k_shot"]
    labels = np.stack([rng.permutation(np.repeat(np.arange(n, dtype=np.int32), k))
                       for _ in range(b)])
    images = rng.uniform(size=(b, n * k, *config["image_shape"])).astype(np.float32)
    return images, sequences.previous_labels(labels), labels


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if FLAGS.interleaved and FLAGS.mode:
        raise app.UsageError("--interleaved times both modes; leave --mode unset")
    if FLAGS.interleaved and FLAGS.profile_dir:
        raise app.UsageError("--interleaved and --profile_dir: profile one mode at a time")
    tf = benchmarks.start_tensorflow()
    from benchmarks import report, runner
    from functional_meta import configs, training

    config = configs.make_config(FLAGS.algorithm, preset=FLAGS.preset,
                                 meta_batch=FLAGS.meta_batch,
                                 backbone="conv4" if FLAGS.encoder_channels else None,
                                 channels=FLAGS.encoder_channels or None)
    batch = tuple(tf.constant(x) for x in random_batch(config, FLAGS.seed))
    device = "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
    default = "xla" if training.default_jit(FLAGS.algorithm) else "function"
    modes = ["xla", "function"] if FLAGS.interleaved else [FLAGS.mode or default]
    runs = {}
    for mode in modes:
        learner = training.make_learner(config, jit_compile=mode == "xla")
        runs[mode] = (learner.step, learner.init(FLAGS.seed))
    if FLAGS.interleaved:
        timings = runner.time_interleaved(runs, lambda: batch, FLAGS.steps, FLAGS.warmup)
    else:
        step, state = runs[modes[0]]
        timings = {modes[0]: runner.time_steps(step, state, lambda: batch, FLAGS.steps,
                                               FLAGS.warmup, FLAGS.profile_dir)}
    memory, what = runner.peak_memory(device)
    encoder = (f", encoder of {FLAGS.encoder_channels} filters" if FLAGS.encoder_channels
               else "")
    header = (f"fm-mann-bench: {FLAGS.algorithm} ({FLAGS.preset}){encoder}, "
              f"{config['meta_batch']} sequences of {config['n_way'] * config['k_shot']} steps, on "
              f"{runner.device_name(device)}")
    for mode, timing in timings.items():
        report.report_reference(
            "mann_bench", f"{header}, mode {mode}", config, timing, more_rows=[
                ("peak memory", f"{memory / 2 ** 20:.1f} MiB ({what}, the whole process)")],
            algorithm=FLAGS.algorithm, mode=mode, device=device, peak_memory_bytes=memory)
    if FLAGS.interleaved:
        ratio = timings["function"]["step_s"]["median"] / timings["xla"]["step_s"]["median"]
        print(f"XLA speed-up over no XLA (median step times): {ratio:.3f}x")


def run():
    define_flags()
    flag_groups.run_binary(main, __name__)


if __name__ == "__main__":
    run()
