"""Benchmark the compiled MAML-RL meta-step (functional_meta.maml_rl): meta-steps/s and
environment steps/s, and side by side in the same run the straightforward implementation a
researcher would write: a Python loop over the tasks, each stepping the environment eagerly one
time step at a time (K trajectories at once), adapting, rolling out again and accumulating the
meta-gradient, then the update. Both use the same tasks, seeds, settings and library functions
(the loop runs them eagerly, task by task), so the ratio is what compiling the whole step buys.

Examples:

  fm-rl-bench --outer=adam                  # 2D navigation, the paper's settings, with Adam
  fm-rl-bench --reference_steps=0 --steps=3          # the compiled TRPO step (the paper's) only
  fm-rl-bench --outer=adam --env=bandit --json
"""

import json
import time

from absl import app, flags

import benchmarks
from benchmarks import flag_groups, rl_run

FLAGS = flags.FLAGS


def define_flags():
    """The binary's flags, defined when it runs: the MAML-RL flags of fm-train (defaults: the
    maml_rl_navigation preset, the paper's settings) and the benchmark's."""
    rl_run.define_rl_flags(common=True)
    flags.adopt_module_key_flags(rl_run)             # --help lists them as this binary's
    flags.DEFINE_integer("reference_steps", 2, "Timed steps of the straightforward eager loop "
                         "(0: skip it); each also has an untimed first call.", lower_bound=0)
    flags.DEFINE_integer("seed", 0, "Seed of the weights, tasks and rollouts.", lower_bound=0)
    flag_groups.define_benchmark_flags()
    flags.adopt_module_key_flags(flag_groups)


def reference_step(env, policy, settings, outer_lr):
    """The straightforward meta-step: for each task in Python, eager rollouts (one eager call per
    time step), the inner step, the post-adaptation rollouts and that task's meta-gradient; then
    the mean over tasks and Adam."""
    import tensorflow as tf
    from functional_meta import maml_rl, optim

    def step(state, batch):
        tasks, seed = batch
        weights = list(state["weights"])
        total = [tf.zeros_like(w) for w in weights]
        count = tasks.shape[0]
        for i in range(count):
            task_seed = maml_rl.fold(seed, 1000 + i)
            samples = maml_rl.sample(env, policy, weights, tasks[i:i + 1], task_seed, settings)
            with tf.GradientTape() as tape:
                tape.watch(weights)
                objective, _, _ = maml_rl.meta_surrogate(policy, weights, samples, settings)
            total = [t + g for t, g in zip(total, tape.gradient(objective, weights))]
        grads = [-t / count for t in total]
        weights, opt = optim.adam_update(grads, weights, state["opt"], outer_lr)
        return {"weights": weights, "opt": opt}

    return step


def _timed(fn, calls):
    times = []
    for i in range(calls):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return times


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    config = rl_run.rl_config_from_flags("maml_rl")
    if FLAGS.reference_steps and config["outer"] != "adam":
        raise app.UsageError("the straightforward loop is written with Adam: pass --outer=adam, "
                             "or --reference_steps=0 to time the compiled TRPO step alone")
    tf = benchmarks.start_tensorflow()
    from functional_meta import envs, maml_rl, training
    env, policy, settings = training.rl_parts(config)
    outer_lr = config["outer_lr"]

    step = maml_rl.make_train_step(env, policy, settings, outer=config["outer"],
                                   outer_lr=outer_lr, max_kl=config["max_kl"])
    meta_batch = config["meta_batch"]
    batches = [tuple(tf.constant(x) for x in envs.task_batch(env, meta_batch, FLAGS.seed, i))
               for i in range(FLAGS.warmup + FLAGS.steps)]
    env_steps = meta_batch * settings.trajectories * (settings.inner_steps + 1) * env.horizon
    rows = {}
    state = maml_rl.init_state(policy, FLAGS.seed, config["outer"])

    def compiled(i):
        nonlocal state
        state, metrics = step(state, batches[i])
        float(metrics["loss"])                          # wait for the step

    first = _timed(lambda i: compiled(i), 1)[0]
    for i in range(1, FLAGS.warmup):
        compiled(i)
    times = _timed(lambda i: compiled(FLAGS.warmup + i), FLAGS.steps)
    rows["compiled"] = {"first_call_s": first, "step_s": sorted(times)[len(times) // 2]}
    if FLAGS.reference_steps:
        ref = reference_step(env, policy, settings, outer_lr)
        ref_state = maml_rl.init_state(policy, FLAGS.seed, "adam")

        def eager(i):
            nonlocal ref_state
            ref_state = ref(ref_state, batches[i % len(batches)])
            float(tf.reduce_sum(ref_state["weights"][0]))

        ref_first = _timed(eager, 1)[0]
        times = _timed(lambda i: eager(i + 1), FLAGS.reference_steps)
        rows["straightforward"] = {"first_call_s": ref_first,
                                   "step_s": sorted(times)[len(times) // 2]}
    device = "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
    print(f"fm-rl-bench: MAML-RL on {env.name} (horizon {env.horizon}), {meta_batch} tasks "
          f"x {settings.trajectories} trajectories, {settings.inner_steps} inner step(s), "
          f"estimator {config['estimator']}, outer {config['outer']}, on {device}; "
          f"{env_steps} environment steps per meta-step")
    for name, row in rows.items():
        row.update(meta_steps_per_s=1.0 / row["step_s"], env_steps_per_s=env_steps / row["step_s"])
        print(f"  {name:16s} first call {row['first_call_s']:8.2f} s   step (median) "
              f"{row['step_s']:8.3f} s   {row['meta_steps_per_s']:8.3f} meta-steps/s   "
              f"{row['env_steps_per_s']:10.0f} env steps/s")
    result = {"env": env.name, "horizon": env.horizon, "meta_batch": meta_batch,
              "trajectories": settings.trajectories, "inner_steps": settings.inner_steps,
              "estimator": config["estimator"], "outer": config["outer"], "device": device,
              "env_steps_per_meta_step": env_steps, **rows}
    if "straightforward" in rows:
        ratio = rows["straightforward"]["step_s"] / rows["compiled"]["step_s"]
        result["speedup"] = ratio
        print(f"compiled step over the straightforward loop (median step times): {ratio:.1f}x")
    if FLAGS.json:
        print(json.dumps(result))


def run():
    define_flags()
    flag_groups.run_binary(main, __name__)


if __name__ == "__main__":
    run()
