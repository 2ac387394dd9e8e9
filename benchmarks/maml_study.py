"""Meta-train MAML and log how much the second-order term matters, as training goes.

Every --log_every steps, on the current meta-batch: the exact meta-gradient split into its
first-order (FOMAML) part and the second-order correction (norms, and the cosine between the
first-order and the exact gradient, overall and per weight tensor), and the support-loss curvature
along the first-order direction, v.Hv / |v|^2 with H the Hessian of the mean per-task support loss
(a Hessian-vector product). Examples:

  fm-maml-study --data=omniglot --data_path=images_background.zip --train_steps=2000
  fm-maml-study --preset=maml_sinusoid --data=sinusoid --output=/tmp/study.jsonl

With --study=imaml it meta-trains implicit MAML instead (functional_meta.imaml) and logs, on
the same meta-batch, the cosine and the relative error |implicit - exact| / |exact| between the
implicit meta-gradient and the exact one through the unrolled proximal inner steps (TensorFlow's
gradient of every step, graph mode without XLA), at --inner_steps along training and, at the first
and last logged steps, at every count of --sweep_inner_steps:

  fm-maml-study --study=imaml --inner_steps=10 --inner_lr=0.1 --sweep_inner_steps=1,2,5,10,20

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
flags.DEFINE_enum("study", "second_order", ["second_order", "imaml"], "second_order: MAML's "
                  "exact meta-gradient against its first-order part; imaml: implicit MAML's "
                  "meta-gradient against the exact unrolled one.")
flags.DEFINE_float("proximal_lambda", 2.0, "--study=imaml: the proximal regularisation lambda of "
                   "the inner problem L(w) + lambda/2 |w - theta|^2.", lower_bound=0.0)
flags.DEFINE_integer("cg_steps", 5, "--study=imaml: conjugate-gradient iterations of the implicit "
                     "meta-gradient.", lower_bound=1)
flags.DEFINE_list("sweep_inner_steps", [], "--study=imaml: inner-step counts at which the first "
                  "and last logged steps also compare the implicit and exact meta-gradients, "
                  "e.g. 1,2,5,10,20.")
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


def make_imaml_study(apply_fn, config, lam, cg_steps, inner_steps):
    """``compare(state, tasks) -> {'cosine', 'relative_error', 'norm_implicit', 'norm_exact',
    'loss'}``: iMAML's implicit meta-gradient (compiled) against the exact gradient through the
    ``inner_steps`` unrolled proximal steps (graph mode: no XLA compile that grows with them)."""
    import numpy as np
    import tensorflow as tf
    from functional_meta import imaml
    options = dict(inner_steps=inner_steps, lam=lam, loss=config["loss"])
    implicit = tf.function(lambda w, lr, t: imaml.meta_gradients(apply_fn, w, t, inner_lr=lr,
                                                                 cg_steps=cg_steps, **options)[:2],
                           jit_compile=True, autograph=False)
    exact = tf.function(lambda w, lr, t: imaml.unrolled_meta_gradients(apply_fn, w, t, inner_lr=lr,
                                                                       **options),
                        autograph=False)

    def compare(state, tasks):
        args = (state["weights"], state["inner_lr"], tasks)
        loss, a = implicit(*args)
        _, b = exact(*args)
        a = np.concatenate([np.ravel(x) for x in a]).astype(np.float64)
        b = np.concatenate([np.ravel(x) for x in b]).astype(np.float64)
        return {"cosine": float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)),
                "relative_error": float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)),
                "norm_implicit": float(np.linalg.norm(a)), "norm_exact": float(np.linalg.norm(b)),
                "loss": float(loss)}

    return compare


def imaml_study(config, next_batch, apply, state):
    """--study=imaml: meta-train iMAML, comparing its meta-gradient with the exact one."""
    from functional_meta import imaml
    steps, lam = config["inner_steps"], FLAGS.proximal_lambda
    try:
        sweep = sorted({int(k) for k in FLAGS.sweep_inner_steps})
        imaml.check_options(steps, lam, FLAGS.cg_steps)
        for k in sweep:
            imaml.check_options(k, lam, FLAGS.cg_steps)
    except ValueError as error:
        raise app.UsageError(f"bad flags (--inner_steps/--proximal_lambda/--cg_steps/"
                             f"--sweep_inner_steps): {error}") from None
    if FLAGS.lr_mode != "fixed":
        raise app.UsageError("--study=imaml adapts with a fixed inner rate: leave --lr_mode unset")
    train = imaml.make_train_step(apply, inner_steps=steps, lam=lam, cg_steps=FLAGS.cg_steps,
                                  outer_lr=config["outer_lr"], loss=config["loss"])
    studies = {}

    def study(k):
        if k not in studies:
            studies[k] = make_imaml_study(apply, config, lam, FLAGS.cg_steps, k)
        return studies[k]

    for step in range(1, FLAGS.train_steps + 1):
        tasks = next_batch()
        if step == 1 or step % FLAGS.log_every == 0 or step == FLAGS.train_steps:
            edge = step in (1, FLAGS.train_steps)
            for k in sorted(set([steps] + (sweep if edge else []))):
                row = {"step": step, "inner_steps": k, "proximal_lambda": lam,
                       "cg_steps": FLAGS.cg_steps, **study(k)(state, tasks)}
                print(f"step {step:6d}  inner steps {k:4d}  loss {row['loss']:.4f}  "
                      f"cos(implicit, exact) {row['cosine']:.6f}  relative error "
                      f"{row['relative_error']:.3e}  |exact| {row['norm_exact']:.3e}", flush=True)
                if FLAGS.output:
                    with open(FLAGS.output, "a") as f:
                        f.write(json.dumps(row) + "\n")
        state, _ = train(state, tasks)


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
    if FLAGS.study == "imaml":
        logging.info("studying iMAML on %s (%s) on %s", config["name"], FLAGS.data, device)
        return imaml_study(config, next_batch, apply, state)
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
