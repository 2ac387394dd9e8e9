"""The MAML-RL branches of fm-train and fm-eval (``--algorithm=maml_rl|pretrain_rl``), and the
MAML-RL flags they share with fm-rl-bench.

fm-train: tasks come from an environment (``functional_meta.envs``), not a data set; the run has
the usual checkpoints, exact resume, progress lines (loss = minus the mean return after
adaptation), TensorBoard and validation (mean return after ``test_inner_steps`` steps on
held-out tasks, seed + 1). fm-eval: the mean return per held-out task before adaptation and
after 1, 2, 3 policy-gradient steps, with 95% intervals, for every checkpoint given (e.g. MAML
and the pretrained policy) and a randomly initialised policy; ``--plot_dir=DIR`` also draws a
held-out goal's trajectories and the return against the number of steps, and writes the figures'
numbers as CSV.

Like the binaries, this module imports TensorFlow only inside the functions that run.
"""

import csv
import functools
import json
import os
import sys
import time

from absl import app, flags, logging

from functional_meta import configs

FLAGS = flags.FLAGS
ENVS = tuple(sorted(configs.RL_ENVS))


def define_rl_flags(flag_values=FLAGS, common=False):
    """The MAML-RL flags; every one defaults to ``None``, the preset's value
    (``maml_rl_navigation``, the MAML paper's). ``common=True`` also defines those fm-train
    already has for every algorithm (``--meta_batch``, ``--inner_steps``, ``--inner_lr``,
    ``--outer_lr``, ``--hidden``)."""
    fv = flag_values
    flags.DEFINE_enum("env", None, list(ENVS), "MAML-RL task family: navigation2d (MAML paper "
                      "sec. 5.3), bandit (Bernoulli 5-armed), tabular_mdp (10 states, 5 "
                      "actions); default navigation2d.", flag_values=fv)
    flags.DEFINE_integer("horizon", None, "MAML-RL time steps per trajectory; default: the "
                         "family's (100 for navigation2d, 10 otherwise).", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("trajectories", None, "MAML-RL K: trajectories per task for each inner "
                         "step and after adaptation; default 20 (the paper's).", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_float("discount", None, "MAML-RL discount of the returns, in (0, 1]; default "
                       "0.99.", lower_bound=0, upper_bound=1, flag_values=fv)
    flags.DEFINE_enum("outer", None, ["trpo", "adam"], "MAML-RL meta-update: trpo (the paper's: "
                      "conjugate gradient on Fisher-vector products and a KL line search inside "
                      "the step; default) or adam (rate --outer_lr).", flag_values=fv)
    flags.DEFINE_float("max_kl", None, "MAML-RL TRPO's bound on the mean KL divergence of the "
                       "adapted policies per meta-step; default 0.01.", lower_bound=0,
                       flag_values=fv)
    flags.DEFINE_enum("estimator", None, ["exact", "lvc", "maml", "first_order"], "MAML-RL "
                      "meta-gradient: exact (default; unbiased, with the pre-adaptation sampling "
                      "term), lvc (ProMP's low-variance curvature, biased), maml (no sampling "
                      "term, as the original code), first_order (no gradient through the inner "
                      "step either: first-order MAML).", flag_values=fv)
    if common:
        flags.DEFINE_integer("meta_batch", None, "Tasks per meta-step; default 20.",
                             lower_bound=1, flag_values=fv)
        flags.DEFINE_integer("inner_steps", None, "Inner policy-gradient steps; default 1.",
                             lower_bound=1, flag_values=fv)
        flags.DEFINE_float("inner_lr", None, "Inner step size alpha; default 0.1.",
                           flag_values=fv)
        flags.DEFINE_float("outer_lr", None, "Adam's rate (--outer=adam); default 0.01.",
                           flag_values=fv)
        flags.DEFINE_list("hidden", None, "Policy hidden widths; default 100,100 (navigation) or "
                          "32,32.", flag_values=fv)


def rl_config_from_flags(algorithm, preset=None, flag_values=FLAGS):
    """The checked MAML-RL config of the flags given; ``app.UsageError`` naming the flag."""
    fv = flag_values
    hidden = None
    if fv["hidden"].value:
        try:
            hidden = [int(h) for h in fv["hidden"].value]
        except ValueError:
            raise app.UsageError(f"--hidden must be integers, got {fv['hidden'].value}") from None
    values = {name: fv[name].value for name in configs.RL_FIELDS
              if name in fv and name != "hidden"}
    if algorithm == "pretrain_rl":
        values.pop("inner_steps", None)
    try:
        return configs.make_rl_config(algorithm, preset or "maml_rl_navigation", hidden=hidden,
                                      **values)
    except ValueError as error:
        raise app.UsageError(f"bad flags: {error}") from None


# ----------------------------------------------------------------------------------------------
# fm-train


def train_main(tf):
    """fm-train's MAML-RL run, its flags parsed and checked."""
    from functional_meta import checkpoints, maml_rl, training
    config = rl_config_from_flags(FLAGS.algorithm, FLAGS.preset)
    if FLAGS.strategy != "none" or FLAGS.task_chunk:
        raise app.UsageError(f"--algorithm={FLAGS.algorithm} runs on one device: leave "
                             "--strategy and --task_chunk unset")
    if checkpoints.has_checkpoints(FLAGS.out_dir) and not FLAGS.resume:
        raise app.UsageError(f"--out_dir={FLAGS.out_dir} already holds checkpoints: pass --resume "
                             "to continue that run, or choose another --out_dir")
    if FLAGS.deterministic:
        tf.config.experimental.enable_op_determinism()
    learner = training.make_learner(config, jit_compile=FLAGS.jit)
    sampler = training.rl_sampler(config, FLAGS.seed)
    validate = None
    if FLAGS.val_every:
        env, policy, settings = training.rl_parts(config)
        evaluate = maml_rl.make_evaluator(env, policy, settings,
                                          max_steps=config["test_inner_steps"])
        validate = functools.partial(_validate, evaluate, env, FLAGS.val_episodes, FLAGS.seed + 1)
    logging.info("training %s (%s, %s) for %d steps into %s", config["algorithm"],
                 config["env"], config["outer"], FLAGS.steps, FLAGS.out_dir)
    start = time.perf_counter()
    try:
        result = training.train(learner, sampler, out_dir=FLAGS.out_dir, steps=FLAGS.steps,
                                seed=FLAGS.seed, log_every=FLAGS.log_every,
                                checkpoint_every=FLAGS.checkpoint_every, keep=FLAGS.keep,
                                validate=validate, val_every=FLAGS.val_every,
                                resume=FLAGS.resume)
    except checkpoints.TrainingStopped as error:
        sys.exit(f"fm-train: stopped: {error}")
    except ValueError as error:
        sys.exit(f"fm-train: {error}")
    elapsed = time.perf_counter() - start
    best = "none (no validation ran)" if result.best is None else result.best
    print(f"trained {config['algorithm']} to step {result.step} in {elapsed:.1f} s; best "
          f"validation: {best}; last checkpoint: {result.checkpoint}")
    if FLAGS.plots:
        from functional_meta import plots
        path = plots.rl_learning_curve(os.path.join(FLAGS.out_dir, training.HISTORY_FILE),
                                       os.path.join(FLAGS.out_dir, "learning_curves.png"),
                                       title=f"{config['algorithm']} ({config['env']})")
        logging.info("wrote %s", path)


def _validate(evaluate, env, num_tasks, seed, state):
    """Validation record: minus the mean return after the test-time steps (the loop's ``loss``,
    lower is better), that return with its 95% interval, and the return before adaptation."""
    from functional_meta import maml_rl
    returns = maml_rl.evaluate_returns(evaluate, state["weights"], env, num_tasks, seed=seed)
    after, half = _interval(returns[-1])
    return {"loss": -after, "return": after, "return_ci95": half,
            "return_before": float(returns[0].mean())}


# ----------------------------------------------------------------------------------------------
# fm-eval


def _interval(values):
    """Mean and 95% half-width (0 for one value)."""
    from functional_meta import metrics
    return metrics.mean_confidence_interval(values)


def evaluate_main(paths, stored):
    """fm-eval on MAML-RL checkpoints: returns before and after 1..N steps (N: --inner_steps,
    default 3) on --num_episodes held-out tasks of seed --eval_seed + 1000, for every checkpoint
    and a random policy; --plot_dir=DIR draws the figures."""
    import benchmarks
    if any(c.get("algorithm") not in configs.RL_ALGORITHMS for c in stored):
        raise app.UsageError("--checkpoint: MAML-RL checkpoints cannot be scored with others")
    keys = ("env", "horizon", "hidden")
    if any(tuple(c[k] for k in keys) != tuple(stored[0][k] for k in keys) for c in stored):
        raise app.UsageError("--checkpoint: the MAML-RL runs differ in env, horizon or policy "
                             "widths; score them separately")
    tf = benchmarks.start_tensorflow()
    import numpy as np
    from functional_meta import checkpoints, envs, maml_rl, training
    max_steps = FLAGS.inner_steps or 3
    base = dict(stored[0], inner_steps=max(stored[0]["inner_steps"], 1))
    env, policy, settings = training.rl_parts(base)
    evaluate = maml_rl.make_evaluator(env, policy, settings, max_steps=max_steps)
    seed = FLAGS.eval_seed + 1000          # apart from training's task seeds (--seed, --seed+1)
    rows, observations = [], {}
    candidates = [(path, config) for path, config in zip(paths, stored)]
    candidates.append(("random", None))
    for path, config in candidates:
        if config is None:
            weights, name = policy.init(FLAGS.eval_seed), "random initialisation"
        else:
            learner = training.make_learner(config)
            state, info, where = checkpoints.restore_state(learner, path)
            weights = state["weights"]
            name = (f"MAML ({config['estimator']}, {config['outer']})"
                    if config["algorithm"] == "maml_rl" else "pretrained (all tasks jointly)")
            name = f"{name} step {info['step']}"
            logging.info("scoring %s", where)
        returns = maml_rl.evaluate_returns(evaluate, weights, env, FLAGS.num_episodes, seed=seed)
        row = {"name": name, "checkpoint": str(path), "tasks": FLAGS.num_episodes}
        for steps, values in enumerate(returns):
            row[f"return_{steps}"], row[f"return_{steps}_ci95"] = _interval(values)
        rows.append(row)
        tasks, pair = envs.task_batch(env, 25, seed, 0)      # evaluate_returns' first batch
        _, obs = evaluate(weights, tf.constant(tasks), tf.constant(pair))
        observations[name] = (np.asarray(obs)[:, 0], tasks[0])
        cells = "  ".join(f"{s} steps {row[f'return_{s}']:8.2f} ± {row[f'return_{s}_ci95']:.2f}"
                          for s in range(max_steps + 1))
        print(f"{name}: mean return on {FLAGS.num_episodes} held-out {env.name} tasks (95% CI): "
              f"{cells}")
        if FLAGS.json:
            print(json.dumps(row))
    if FLAGS.plot_dir:
        _draw(FLAGS.plot_dir, rows, observations, max_steps, env)


def _draw(folder, rows, observations, max_steps, env):
    from functional_meta import plots
    os.makedirs(folder, exist_ok=True)
    table = os.path.join(folder, "returns.csv")
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    drawn = [table, plots.returns_by_step(rows, max_steps, os.path.join(folder, "returns.png"),
                                          title=f"{env.name}: return after adaptation")]
    if env.name == "navigation2d":
        name = rows[0]["name"]
        obs, goal = observations[name]
        drawn.append(plots.navigation_trajectories(
            obs, goal, os.path.join(folder, "trajectories.png"), title=name))
    for path in drawn:
        logging.info("wrote %s", path)
        print(f"wrote {path}")
