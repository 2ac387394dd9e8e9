"""The straightforward TensorFlow MAML step, for side-by-side comparisons with the library's.

Besides the PyTorch step (fm-torch-reference), the library's MAML speed is compared with what a
researcher would write in TensorFlow without this library: a Python loop over the tasks, each
adapted with its own nested ``GradientTape`` on an ordinary convolutional network
(``tf.nn.conv2d``, fused batch norm), the second-order meta-gradient of the mean query loss and
the Adam update, compiled with XLA (the whole meta-batch unrolled in one graph) or run eagerly as a
tutorial writes it. This binary is that step on the CPU, for the conv4 MAML presets, on the same
synthetic batch and from the same initial weights as fm-maml-bench, so that both can run back to
back on the same machine:

  fm-tf-reference                                 # config A (maml_omniglot_5way), XLA
  fm-tf-reference --mode=eager --steps=3          # the tutorial's eager loop
  fm-tf-reference --interleaved --steps=30        # and the library's step, in alternating rounds

The network is the library's conv4 written plainly for one task's images at a time
(``tf.nn.conv2d``, fused batch norm, ReLU, the dense head) over the library's weight list, from its
initial weights; no Keras object can hide a weight from the tapes. tests/test_tf_reference.py
checks in float64 that the loop's meta-gradient equals ``maml.meta_gradients``, and in float32
that the fused batch norm is exact in second order. Not used by the library.
"""

from absl import app, flags

import benchmarks

tf = benchmarks.start_tensorflow()      # this module is the TensorFlow step: imported at once

from benchmarks import flag_groups, report, runner  # noqa: E402
from functional_meta import maml, nets, optim, presets, training  # noqa: E402

FLAGS = flags.FLAGS
MAML_PRESETS = sorted(name for name, c in presets.PRESETS.items()
                      if c["family"] == "maml" and c["net"] == "conv4")


def define_flags():
    """The binary's flags, defined when it runs (not on import: the tests import this module
    beside the other binaries, whose flags share names such as ``--n_way``)."""
    flags.DEFINE_enum("preset", "maml_omniglot_5way", MAML_PRESETS,
                      "Configuration to run (the conv4 MAML presets of functional_meta.presets).")
    flag_groups.define_episode_flags("maml")
    flags.DEFINE_integer("inner_steps", None, "Inner SGD steps; default: the preset's.",
                         lower_bound=1)
    flags.DEFINE_enum("mode", "xla", list(flag_groups.MODES),
                      "xla: the step in tf.function(jit_compile=True), tasks unrolled; function: "
                      "tf.function without XLA; eager: op by op, as the tutorial runs it.")
    flags.DEFINE_bool("interleaved", False, "Also compile the library's step as fm-maml-bench runs "
                      "it on the CPU (same batch and initial weights, default task chunks) and "
                      f"time both in alternating rounds of {runner.INTERLEAVE_ROUND} steps, so "
                      "that the machine's drift between runs hits both alike; prints the "
                      "library's rows and the speedup (ratio of the median step times). Needs "
                      "--mode=xla.")
    flags.DEFINE_integer("seed", 0, "Seed of the initial weights (the library's init) and the "
                         "synthetic batch (fm-maml-bench's, for the same --seed).", lower_bound=0)
    flag_groups.define_benchmark_flags()
    flags.adopt_module_key_flags(flag_groups)      # --help lists the groups' flags too


def _batch_norm(x, scale, offset):
    """Batch norm with the batch's statistics: TensorFlow's fused kernel (float32), or the same
    function spelled out for float64, which that kernel lacks (the tests)."""
    if x.dtype == tf.float32:
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(x, scale, offset, epsilon=nets.BN_EPSILON,
                                                   is_training=True)
        return y
    centred = x - tf.reduce_mean(x, [0, 1, 2])
    variance = tf.reduce_mean(tf.square(centred), [0, 1, 2])
    return centred * tf.math.rsqrt(variance + nets.BN_EPSILON) * scale + offset


def conv4(weights, x, pool):
    """The library's ``nets.conv4`` (with a head) on one batch of NHWC images ``x``."""
    stride = 2 if pool == "stride" else 1
    for b in range(4):
        kernel, scale, offset = weights[3 * b:3 * b + 3]
        x = tf.nn.relu(_batch_norm(tf.nn.conv2d(x, kernel, stride, "SAME"), scale, offset))
        if pool == "max":
            x = tf.nn.max_pool2d(x, 2, 2, "VALID")
    x = tf.reshape(x, [x.shape[0], -1])
    return tf.matmul(x, weights[-2]) + weights[-1]


def meta_gradients(weights, tasks, inner_lr, inner_steps, pool="stride"):
    """The mean query loss after ``inner_steps`` SGD steps per task and its second-order gradient,
    as a loop over the tasks, each with its own nested tape."""
    def loss_fn(w, x, y):
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, conv4(w, x, pool)))

    support_x, support_y, query_x, query_y = tasks
    with tf.GradientTape() as outer:
        outer.watch(weights)
        losses = []
        for i in range(support_x.shape[0]):
            fast = list(weights)
            for _ in range(inner_steps):
                with tf.GradientTape() as inner:
                    inner.watch(fast)
                    support_loss = loss_fn(fast, support_x[i], support_y[i])
                grads = inner.gradient(support_loss, fast)
                fast = [w - inner_lr * g for w, g in zip(fast, grads)]
            losses.append(loss_fn(fast, query_x[i], query_y[i]))
        meta_loss = tf.add_n(losses) / len(losses)
    return meta_loss, outer.gradient(meta_loss, weights)


def make_train_step(config, mode):
    """``step(state, tasks) -> (state, {'loss'})`` with ``state = (weights, adam_state)``."""
    def step(state, tasks):
        weights, opt = state
        loss, grads = meta_gradients(weights, tasks, config["inner_lr"], config["inner_steps"],
                                     config["pool"])
        weights, opt = optim.adam_update(grads, weights, opt, config["outer_lr"])
        return (weights, opt), {"loss": loss}

    if mode == "eager":
        return step
    return tf.function(step, jit_compile=mode == "xla", autograph=False)


def _interleaved_with_library(config, apply, weights, step, state, next_batch):
    """``--interleaved``: the reference's timing, and the library's step (as fm-maml-bench runs it
    on the CPU) timed in alternating rounds with it, as JSON fields and printed rows."""
    chunk = training.default_task_chunk(config)
    library = maml.make_train_step(apply, inner_steps=config["inner_steps"],
                                   outer_lr=config["outer_lr"], task_chunk=chunk)
    timings = runner.time_interleaved(
        {"reference": (step, state),
         "library": (library, maml.init_state(weights, config["inner_lr"]))},
        next_batch, FLAGS.steps, FLAGS.warmup)
    timing, lib = timings["reference"], timings["library"]
    speedup = timing["step_s"]["median"] / lib["step_s"]["median"]
    lib_record = {"config": config, "steps": FLAGS.steps, "warmup": FLAGS.warmup, **lib}
    extra = {"library": {**lib, "task_chunk": chunk,
                         "tasks_per_s": report.throughput(lib_record)[0]}, "speedup": speedup}
    rounds = f"alternating rounds of {runner.INTERLEAVE_ROUND} steps"
    rows = [("library", f"functional_meta's step (task chunks of {chunk or 'all'}), timed in "
                        f"{rounds} with the one above"),
            *report.timing_rows(lib_record),
            ("speedup", f"{speedup:.3f}x (the reference's median step time over the library's)")]
    return timing, extra, rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    overrides = {name: FLAGS[name].value for name in
                 ("n_way", "k_shot", "q_query", "meta_batch", "inner_steps")}
    config = presets.get(FLAGS.preset, **overrides)
    if FLAGS.interleaved and FLAGS.mode != "xla":
        raise app.UsageError(f"--interleaved needs --mode=xla (got --mode={FLAGS.mode}): the "
                             "library's step is XLA-compiled, as fm-maml-bench runs it on the CPU")
    if FLAGS.interleaved and FLAGS.profile_dir:
        raise app.UsageError("--interleaved and --profile_dir: profile one step at a time "
                             "(fm-tf-reference or fm-maml-bench with --profile_dir)")
    runner.choose_device("cpu")                     # the CPU, as the side-by-side pairs
    init, apply = presets.network(config)
    weights = init(FLAGS.seed)
    next_batch, _ = runner.input_batches(config, "synthetic", None, FLAGS.seed)
    step = make_train_step(config, FLAGS.mode)
    state = (weights, optim.adam_init(weights))
    extra, more_rows = {}, []
    if FLAGS.interleaved:
        timing, extra, more_rows = _interleaved_with_library(config, apply, weights, step, state,
                                                             next_batch)
    else:
        timing = runner.time_steps(step, state, next_batch, FLAGS.steps, FLAGS.warmup,
                                   FLAGS.profile_dir)
    report.report_reference(
        "tf_reference",
        f"Straightforward TensorFlow {tf.__version__} MAML, {FLAGS.preset} ({config['n_way']}-way "
        f"{config['k_shot']}-shot {config['q_query']}-query, meta-batch {config['meta_batch']}, "
        f"{config['inner_steps']} inner step(s)), mode={FLAGS.mode}, CPU", config, timing,
        first_call_note="trace + compile + run", more_rows=more_rows, mode=FLAGS.mode,
        tf_version=tf.__version__, **extra)


def run():
    define_flags()
    flag_groups.run_binary(main, __name__)


if __name__ == "__main__":
    run()
