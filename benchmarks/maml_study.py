"""Meta-train MAML and log how much the second-order term matters, as training goes.

Every --log_every steps, on the current meta-batch: the exact meta-gradient split into its
first-order (FOMAML) part and the second-order correction (norms, and the cosine between the
first-order and the exact gradient, overall and per weight tensor), and the support-loss curvature
along the first-order direction, v.Hv / |v|^2 with H the Hessian of the mean per-task support loss
(a Hessian-vector product). Examples:

  fm-maml-study --data=omniglot --data_path=images_background.zip --train_steps=2000
  fm-maml-study --preset=maml_sinusoid --data=sinusoid --output=/tmp/study.jsonl

Each logged row is printed and, with --output, appended as one JSON line.
"""

import json

from absl import app, flags, logging

import benchmarks
from benchmarks import flag_groups
from functional_meta import presets              # free of TensorFlow, as this module

FLAGS = flags.FLAGS
flag_groups.define_model_flags("maml")
flag_groups.define_episode_flags("maml")
flag_groups.define_maml_flags()
flag_groups.define_data_flags()
flag_groups.define_device_flags()
flags.DEFINE_integer("train_steps", 200, "Meta-training steps.", lower_bound=1)
flags.DEFINE_integer("log_every", 20, "Measure the second-order term every this many steps.",
                     lower_bound=1)
flags.DEFINE_string("output", None, "Append one JSON line per measurement to this file.")
flags.adopt_module_key_flags(flag_groups)


def make_study(apply_fn, config):
    """A compiled function of (state, tasks) giving the split and the curvature."""
    import tensorflow as tf
    from functional_meta import second_order
    kwargs = dict(inner_steps=config["inner_steps"], loss=config["loss"])

    @tf.function(jit_compile=True, autograph=False)
    def study(state, tasks):
        weights = state["weights"]
        out = second_order.split(apply_fn, weights, tasks, inner_lr=state["inner_lr"], **kwargs)
        first = out["first_order"]
        scale = out["norm_first_order_total"]
        direction = [g / scale for g in first]
        hv = second_order.support_hvp(apply_fn, weights, tasks[0], tasks[1], direction,
                                      loss=config["loss"])
        curvature = tf.add_n([tf.reduce_sum(h * v) for h, v in zip(hv, direction)])
        keep = {k: v for k, v in out.items() if k.startswith(("norm_", "cosine"))}
        return keep, curvature / tasks[0].shape[0]

    return study


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    benchmarks.start_tensorflow()
    from benchmarks import runner
    from functional_meta import maml
    device = runner.choose_device(FLAGS.device)
    config = flag_groups.config_from_flags("maml")
    next_batch, _ = runner.input_batches(config, FLAGS.data, FLAGS.data_path, FLAGS.seed)
    init, apply = presets.network(config)
    steps = config["inner_steps"]
    state = maml.init_state(init(FLAGS.seed), config["inner_lr"], FLAGS.lr_mode, steps)
    train = maml.make_train_step(apply, **flag_groups.maml_options(config))
    study = make_study(apply, config)
    logging.info("studying %s on %s (%s)", config["name"], FLAGS.data, device)
    for step in range(1, FLAGS.train_steps + 1):
        tasks = next_batch()
        if step == 1 or step % FLAGS.log_every == 0 or step == FLAGS.train_steps:
            numbers, curvature = study(state, tasks)
            row = {"step": step, "curvature": float(curvature),
                   **{k: [float(x) for x in v] if isinstance(v, list) else float(v)
                      for k, v in numbers.items()}}
            state, metrics = train(state, tasks)
            row["meta_loss"] = float(metrics["loss"])
            print(f"step {step:6d}  meta-loss {row['meta_loss']:.4f}  "
                  f"|exact| {row['norm_exact_total']:.3e}  |first-order| "
                  f"{row['norm_first_order_total']:.3e}  |correction| "
                  f"{row['norm_correction_total']:.3e}  cos(first-order, exact) "
                  f"{row['cosine_total']:.4f}  curvature {row['curvature']:.3e}", flush=True)
            if FLAGS.output:
                with open(FLAGS.output, "a") as f:
                    f.write(json.dumps(row) + "\n")
        else:
            state, metrics = train(state, tasks)


def run():
    flag_groups.run_binary(main, __name__)


if __name__ == "__main__":
    run()
