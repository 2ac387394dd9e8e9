"""MAML-RL (functional_meta.maml_rl): the meta-gradient estimator against a closed form, the
derivatives against finite differences in float64, the TRPO pieces, bad settings, and a short
meta-training run on 2D navigation."""

import math

import numpy as np
import pytest
import tensorflow as tf

from functional_meta import envs, maml_rl, optim

THETA, GOAL, SIGMA, ALPHA, K = 0.3, 0.0, 0.5, 0.2, 4


def _point_env():
    """A one-step, one-dimensional task: reward ``-(a - g)^2``, constant observation 0."""
    def reset(tasks, batch, seed=None):
        tasks = tf.convert_to_tensor(tasks, tf.float64)
        return tf.broadcast_to(tasks[:, None, :], [tasks.shape[0], batch, 1])

    def step(goal, action):
        return goal, -tf.reduce_sum(tf.square(tf.cast(action, tf.float64) - goal), -1), \
            tf.zeros(goal.shape[:2], tf.bool)

    return envs.Env("point1d", 1, 1, False, 1, 1, lambda rng, n: np.zeros((n, 1)), reset, step,
                    lambda goal: tf.zeros_like(goal))


def _linear_gaussian_policy():
    """``a ~ N(theta, SIGMA^2)``: one weight, the mean; the standard deviation is fixed."""
    base = maml_rl.gaussian_mlp_policy(1, 1, hidden=())
    log_sigma = math.log(SIGMA)

    def distribution(weights, obs):
        theta = weights[0]
        mean = tf.zeros_like(obs) + (theta if theta.shape.rank == 1 else theta[:, None, :])
        return mean, tf.fill(mean.shape, tf.constant(log_sigma, mean.dtype))

    return base._replace(init=lambda seed, dtype=tf.float64: [tf.constant([THETA], dtype)],
                         distribution=distribution)


def _analytic_meta_gradient():
    """d/dtheta E_tau[V(theta')] for the point task, one inner step, no baseline.

    Pre-adaptation actions ``a_k = theta + e_k``, ``e_k ~ N(0, s^2)``, rewards
    ``r_k = -(d + e_k)^2`` with ``d = theta - g``. The inner step is the vanilla policy gradient
    ``theta' = theta + alpha * mean_k g_k`` with ``g_k = grad log pi(a_k) r_k = -e_k (d + e_k)^2 / s^2``.
    Moments of the normal: ``E[g_k] = -2d`` and ``E[g_k^2] = E[e^2 (d + e)^4] / s^4
    = d^4/s^2 + 18 d^2 + 15 s^2``, so ``Var(g_k) = d^4/s^2 + 14 d^2 + 15 s^2``.
    ``V(theta') = E_{a ~ N(theta', s^2)}[-(a - g)^2] = -(theta' - g)^2 - s^2``, hence
    ``J(theta) = E[V(theta')] = -(d + alpha E[mean g])^2 - alpha^2 Var(g)/K - s^2
    = -(1 - 2 alpha)^2 d^2 - alpha^2/K (d^4/s^2 + 14 d^2 + 15 s^2) - s^2`` and
    ``dJ/dtheta = -2 (1 - 2 alpha)^2 d - alpha^2/K (4 d^3/s^2 + 28 d)``.
    (The variance term is the sampling distribution's effect: an estimator that ignores how the
    pre-adaptation samples depend on ``theta`` misses part of it.)
    """
    d, s = THETA - GOAL, SIGMA
    return -2 * (1 - 2 * ALPHA) ** 2 * d - ALPHA ** 2 / K * (4 * d ** 3 / s ** 2 + 28 * d)


def _monte_carlo_meta_gradients(estimator, batches=30, tasks=2000):
    env, policy = _point_env(), _linear_gaussian_policy()
    settings = maml_rl.Settings(trajectories=K, inner_steps=1, inner_lr=ALPHA, discount=1.0,
                                baseline=False, normalize_inner=False,
                                estimator=estimator)

    @tf.function(jit_compile=True, autograph=False)
    def estimate(weights, seed):
        goals = tf.fill([tasks, 1], tf.constant(GOAL, tf.float64))
        grads, _ = maml_rl.meta_gradient(env, policy, weights, goals, seed, settings)
        return grads[0][0]

    weights = policy.init(0)
    return np.array([float(estimate(weights, tf.constant([11, i], tf.int32)))
                     for i in range(batches)])


@pytest.mark.slow
def test_meta_gradient_matches_closed_form_and_needs_the_sampling_term():
    """The DiCE-style estimator's Monte-Carlo mean is within 3 standard errors of the analytic
    meta-gradient (``_analytic_meta_gradient``); without the term for the pre-adaptation sampling
    distribution (what the original MAML code differentiates) it is many standard errors off.
    Dropping the second-order path through the inner step, or the term, or scaling either,
    fails it."""
    truth = _analytic_meta_gradient()
    exact = _monte_carlo_meta_gradients("exact")
    naive = _monte_carlo_meta_gradients("maml")
    for values, name in ((exact, "exact"), (naive, "naive")):
        se = values.std(ddof=1) / math.sqrt(len(values))
        print(f"{name}: {values.mean():.4f} +- {se:.4f} (truth {truth:.4f})")
    se = exact.std(ddof=1) / math.sqrt(len(exact))
    assert abs(exact.mean() - truth) < 3 * se, (exact.mean(), truth, se)
    se_naive = naive.std(ddof=1) / math.sqrt(len(naive))
    assert abs(naive.mean() - truth) > 8 * se_naive, (naive.mean(), truth, se_naive)


def _tiny_navigation(dtype=tf.float64, horizon=5, trajectories=3, tasks=2, seed=0):
    """Samples of a tiny float64 MAML-RL meta-step on 2D navigation, for derivative checks."""
    env = envs.navigation2d(horizon=horizon)
    policy = maml_rl.gaussian_mlp_policy(2, 2, hidden=(4,), init_log_std=-0.5,
                                         activation=tf.nn.tanh)
    settings = maml_rl.Settings(trajectories=trajectories, inner_steps=2, inner_lr=0.3,
                                discount=0.9)
    weights = policy.init(seed, dtype)
    goals, pair = envs.task_batch(env, tasks, seed, 0)
    samples = maml_rl.sample(env, policy, weights, tf.constant(goals), tf.constant(pair), settings)
    return env, policy, settings, weights, samples


def _finite_difference(f, weights, direction, eps=1e-6):
    plus = f([w + eps * d for w, d in zip(weights, direction)])
    minus = f([w - eps * d for w, d in zip(weights, direction)])
    return (plus - minus) / (2 * eps)


def test_second_order_surrogate_gradient_matches_finite_differences_float64():
    """The gradient of the line-search surrogate (importance-weighted post-adaptation objective,
    two inner steps recomputed from the weights) against central differences: a dropped or
    doubled second-order term through the inner steps fails it."""
    _, policy, settings, weights, samples = _tiny_navigation()
    plain = settings._replace(estimator="maml")
    _, _, old_log_p = maml_rl.meta_surrogate(policy, weights, samples, plain)

    def f(w):
        return maml_rl.meta_surrogate(policy, w, samples, plain, old_log_p)[0]

    with tf.GradientTape() as tape:
        tape.watch(weights)
        value = f(weights)
    grads = tape.gradient(value, weights)
    direction = [tf.random.stateless_normal(w.shape, [1, i], dtype=tf.float64)
                 for i, w in enumerate(weights)]
    analytic = sum(float(tf.reduce_sum(g * d)) for g, d in zip(grads, direction))
    numeric = float(_finite_difference(f, weights, direction))
    assert abs(analytic - numeric) < 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)
    # First order differs: the inner steps' Jacobian is then the identity.
    first = settings._replace(estimator="maml", first_order=True)
    with tf.GradientTape() as tape:
        tape.watch(weights)
        value = maml_rl.meta_surrogate(policy, weights, samples, first, old_log_p)[0]
    fo = sum(float(tf.reduce_sum(g * d)) for g, d in zip(tape.gradient(value, weights), direction))
    assert abs(fo - numeric) > 1e-4 * max(1.0, abs(numeric))


def test_conjugate_gradient_solves_a_small_spd_system():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(6, 6))
    a = m @ m.T + 0.5 * np.eye(6)
    b = rng.normal(size=6)
    x = optim.conjugate_gradient(lambda v: tf.linalg.matvec(tf.constant(a), v), tf.constant(b),
                                 iterations=6, residual_tol=1e-30)
    np.testing.assert_allclose(x.numpy(), np.linalg.solve(a, b), rtol=1e-8, atol=1e-10)
    few = optim.conjugate_gradient(lambda v: tf.linalg.matvec(tf.constant(a), v),
                                   tf.constant(b), iterations=2)
    assert np.linalg.norm(few.numpy() - np.linalg.solve(a, b)) > 1e-6   # iterations count


def test_fisher_vector_product_equals_explicit_fisher_float64():
    """For a tiny Gaussian policy the Hessian of the mean KL at the old policy equals the Fisher
    matrix ``mean_s J_mu^T diag(exp(-2 log_std)) J_mu`` plus ``2 I`` on the log standard
    deviations, built explicitly from the Jacobian of the mean."""
    policy = maml_rl.gaussian_mlp_policy(2, 2, hidden=(3,), init_log_std=-0.3,
                                         activation=tf.nn.tanh)
    weights = policy.init(4, tf.float64)
    obs = tf.random.stateless_normal([1, 7, 2], [5, 6], dtype=tf.float64)
    old = tf.nest.map_structure(tf.stop_gradient, policy.distribution(weights, obs))

    def kl_fn(w):
        return tf.reduce_mean(policy.kl(old, policy.distribution(w, obs)))

    sizes = [int(np.prod(w.shape)) for w in weights]
    n = sum(sizes)
    fvp = maml_rl.fisher_vector_product(kl_fn, weights)
    implicit = np.stack([fvp(tf.constant(np.eye(n)[i])).numpy() for i in range(n)])
    with tf.GradientTape() as tape:
        tape.watch(weights)
        mean = policy.distribution(weights, obs)[0][0]          # [7, 2]
    jac = tape.jacobian(mean, weights[:-1])
    jac = np.concatenate([j.numpy().reshape(7, 2, -1) for j in jac], -1)   # [7, 2, P]
    precision = np.exp(-2 * weights[-1].numpy())
    explicit = np.zeros((n, n))
    p = n - 2
    explicit[:p, :p] = np.einsum("sap,a,saq->pq", jac, precision, jac) / 7
    explicit[p:, p:] = 2 * np.eye(2)
    np.testing.assert_allclose(implicit, explicit, atol=1e-10)


def test_fisher_vector_product_through_adaptation_two_ways_agree_float64():
    """``J^T F J v`` (forward then reverse products) equals the Hessian-vector product of the KL
    through the inner steps at the old policy."""
    _, policy, settings, weights, samples = _tiny_navigation()
    old = tf.nest.map_structure(
        tf.stop_gradient, maml_rl.distributions(
            policy, maml_rl.adapted_weights(policy, weights, samples, settings), samples.post))

    def kl_adapted(theta):
        return tf.reduce_mean(policy.kl(old, maml_rl.distributions(policy, theta, samples.post)))

    adapt = lambda w: maml_rl.adapted_weights(policy, w, samples, settings)  # noqa: E731
    hessian = maml_rl.fisher_vector_product(lambda w: kl_adapted(adapt(w)), weights)
    jvp = maml_rl.fisher_vector_product_jvp(adapt, kl_adapted, weights)
    v = tf.random.stateless_normal([sum(int(np.prod(w.shape)) for w in weights)], [2, 3],
                                   dtype=tf.float64)
    a, b = hessian(v).numpy(), jvp(v).numpy()
    assert np.linalg.norm(a) > 1e-3
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


def test_line_search_respects_the_kl_bound():
    """KL = |w|^2 / 2 from w = 0 along a step of KL 8: the accepted step is the first
    backtracking fraction with KL <= max_kl; with no acceptable fraction the weights stay."""
    weights = [tf.zeros([2], tf.float64)]
    step = [tf.constant([4.0, 0.0], tf.float64)]

    def evaluate(w):
        return tf.reduce_sum(w[0]), 0.5 * tf.reduce_sum(tf.square(w[0]))

    new, fraction, kl = maml_rl.line_search(evaluate, weights, step, max_kl=0.5, backtracks=15,
                                            ratio=0.8)
    expected = next(0.8 ** j for j in range(15) if 0.5 * (4 * 0.8 ** j) ** 2 <= 0.5)
    assert float(fraction) == pytest.approx(expected)
    assert float(kl) <= 0.5 and float(kl) > 0.5 * 0.8 ** 2
    np.testing.assert_allclose(new[0].numpy(), [4 * expected, 0.0])
    new, fraction, _ = maml_rl.line_search(evaluate, weights, step, max_kl=1e-6, backtracks=5)
    assert float(fraction) == 0.0
    np.testing.assert_array_equal(new[0].numpy(), [0.0, 0.0])
    worse = lambda w: (-tf.reduce_sum(w[0]), 0.0 * tf.reduce_sum(w[0]))  # noqa: E731
    assert float(maml_rl.line_search(worse, weights, step, max_kl=1.0)[1]) == 0.0


@pytest.mark.slow
def test_trpo_step_keeps_the_post_adaptation_kl_within_the_bound():
    """A whole TRPO meta-step (eager): the mean KL between the old and new adapted policies,
    recomputed independently, is at most max_kl, and the step moved the weights."""
    _, policy, settings, weights, samples = _tiny_navigation(dtype=tf.float32, horizon=8,
                                                             trajectories=4, tasks=3)
    new, metrics = maml_rl.trpo_update(policy, weights, samples, settings, max_kl=1e-3)
    old = maml_rl.distributions(policy, maml_rl.adapted_weights(policy, weights, samples,
                                                                settings), samples.post)
    fresh = maml_rl.distributions(policy, maml_rl.adapted_weights(policy, new, samples, settings),
                                  samples.post)
    mask = tf.reshape(samples.post.mask, [3, -1])
    kl = float(tf.reduce_sum(policy.kl(old, fresh) * mask) / tf.reduce_sum(mask))
    assert float(metrics["step_fraction"]) > 0
    assert 0 < kl <= 1e-3 * 1.001
    assert kl == pytest.approx(float(metrics["kl"]), rel=1e-3)


@pytest.mark.parametrize("settings, message", [
    (maml_rl.Settings(trajectories=0), "trajectories"),
    (maml_rl.Settings(trajectories=2.5), "trajectories"),
    (maml_rl.Settings(inner_steps=-1), "inner_steps"),
    (maml_rl.Settings(inner_lr=0.0), "inner_lr"),
    (maml_rl.Settings(discount=1.5), "discount"),
    (maml_rl.Settings(estimator="dice"), "estimator"),
])
def test_bad_settings_fail_before_compiling(settings, message):
    env = envs.navigation2d()
    with pytest.raises(ValueError, match=message):
        maml_rl.make_train_step(env, maml_rl.default_policy(env), settings)


def test_a_k_that_cannot_fit_the_baseline_fails_clearly():
    env = envs.navigation2d(horizon=1)           # 1 x 3 steps per task, 8 baseline features
    with pytest.raises(ValueError, match="trajectories=3 x horizon=1"):
        maml_rl.make_train_step(env, maml_rl.default_policy(env),
                                maml_rl.Settings(trajectories=3))
    with pytest.raises(ValueError, match="outer must be one of"):
        maml_rl.make_train_step(env, maml_rl.default_policy(env), outer="sgd")


@pytest.mark.slow
def test_short_meta_training_beats_the_pretrained_policy_on_held_out_goals():
    """150 Adam meta-steps on 2D navigation (horizon 20, small policy) against the same budget of
    joint pretraining: after one inner step on 40 held-out goals MAML's return is higher than the
    pretrained policy's by more than both 95% intervals. Breaking the inner step's gradient, the
    adaptation or the meta-gradient loses this."""
    env = envs.navigation2d(horizon=20)
    policy = maml_rl.gaussian_mlp_policy(2, 2, hidden=(32, 32))
    evaluate = maml_rl.make_evaluator(env, policy, maml_rl.Settings(trajectories=10),
                                      max_steps=1)
    after_one_step = {}
    for name, inner_steps in (("maml", 1), ("pretrained", 0)):
        settings = maml_rl.Settings(trajectories=10, inner_steps=inner_steps, estimator="lvc")
        step = maml_rl.make_train_step(env, policy, settings, outer="adam", outer_lr=0.01)
        state = maml_rl.init_state(policy, 0, "adam")
        for i in range(150):
            state, _ = step(state, envs.task_batch(env, 10, seed=0, index=i))
        returns = maml_rl.evaluate_returns(evaluate, state["weights"], env, 40, seed=1000,
                                           batch=20)[1]
        after_one_step[name] = (returns.mean(), 1.96 * returns.std(ddof=1) / math.sqrt(40))
    (maml_mean, maml_ci), (pre_mean, pre_ci) = after_one_step["maml"], after_one_step["pretrained"]
    assert maml_mean - maml_ci > pre_mean + pre_ci, after_one_step


@pytest.mark.slow
def test_training_loop_resumes_exactly(tmp_path):
    """``training.train`` on a MAML-RL learner: 2 steps, then a resume to 4, equals 4 steps in one
    go (weights and logged losses): the step is a pure function of the state and the
    ``(tasks, seed)`` batch."""
    from functional_meta import checkpoints, configs, training
    config = configs.make_rl_config("maml_rl", horizon=5, trajectories=3, meta_batch=2,
                                    hidden=[8], outer="adam")
    learner = training.make_learner(config)
    whole = training.train(learner, training.rl_sampler(config, 3), out_dir=tmp_path / "a",
                           steps=4, seed=1, log_every=1, summaries=False)
    training.train(learner, training.rl_sampler(config, 3), out_dir=tmp_path / "b", steps=2,
                   seed=1, log_every=1, checkpoint_every=1, summaries=False)
    rest = training.train(learner, training.rl_sampler(config, 3), out_dir=tmp_path / "b",
                          steps=4, seed=1, log_every=1, resume=True, summaries=False)
    assert rest.losses == whole.losses[2:]
    a, _, _ = checkpoints.restore_state(learner, tmp_path / "a")
    b, _, _ = checkpoints.restore_state(learner, tmp_path / "b")
    for x, y in zip(a["weights"], b["weights"]):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


@pytest.mark.parametrize("overrides, message", [
    (dict(env="cartpole"), "env must be one of"),
    (dict(horizon=0), "horizon must be a positive integer"),
    (dict(trajectories=1, horizon=3), "trajectories=1 x horizon=3"),
    (dict(outer="sgd"), "outer must be"),
    (dict(inner_steps=0), "inner_steps must be a positive integer for maml_rl"),
])
def test_bad_rl_configs_fail_before_anything_compiles(overrides, message):
    from functional_meta import configs
    with pytest.raises(ValueError, match=message):
        configs.make_rl_config("maml_rl", **overrides)


@pytest.mark.parametrize("args, message", [
    (["--env=cartpole"], "flag --env=cartpole: value should be one of"),
    (["--horizon=0"], "--horizon=0: 0 is not a positive integer"),
    (["--trajectories=1", "--horizon=3"], "trajectories=1 x horizon=3 steps per task cannot fit"),
    (["--outer=adam", "--estimator=dice"], "flag --estimator=dice: value should be one of"),
])
def test_fm_train_rejects_bad_rl_flags_before_tensorflow(tmp_path, args, message):
    """fm-train --algorithm=maml_rl with an unknown env, a horizon below 1 or a K too small for
    the baseline exits with a message naming the flag, without importing TensorFlow (fast)."""
    import subprocess
    import sys
    import time
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "benchmarks.train", "--algorithm=maml_rl",
                           f"--out_dir={tmp_path}", *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr[-2000:]
    assert "Compiled cluster" not in done.stderr
    assert not list(tmp_path.iterdir())                       # nothing written
    assert time.perf_counter() - start < 60


def test_leave_one_out_baseline_never_uses_the_tasks_own_value():
    """Each task's baseline equals a regression fitted without it (numpy), so changing a task's
    value leaves its own baseline unchanged; high-dimensional tasks get the others' mean."""
    rng = np.random.default_rng(0)
    tasks = rng.uniform(-0.5, 0.5, size=(12, 2))
    values = rng.normal(size=12)
    got = maml_rl.leave_one_out_baseline(tf.constant(tasks), tf.constant(values)).numpy()
    x = np.concatenate([np.ones((12, 1)), tasks, tasks ** 2], 1)
    for i in range(12):
        keep = np.arange(12) != i
        coef = np.linalg.solve(x[keep].T @ x[keep] + 1e-3 * np.eye(5), x[keep].T @ values[keep])
        assert got[i] == pytest.approx(x[i] @ coef, abs=1e-8)
    changed = values.copy()
    changed[3] += 10.0
    again = maml_rl.leave_one_out_baseline(tf.constant(tasks), tf.constant(changed)).numpy()
    assert again[3] == pytest.approx(got[3], abs=1e-8)
    wide = maml_rl.leave_one_out_baseline(tf.constant(rng.normal(size=(4, 9))),
                                          tf.constant(values[:4])).numpy()
    np.testing.assert_allclose(wide, [(values[:4].sum() - v) / 3 for v in values[:4]], atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bandit", "tabular_mdp"])
def test_discrete_families_train_with_the_softmax_policy(name):
    """One compiled TRPO meta-step on each simulator-free family: finite metrics, a KL within the
    bound, and weights that moved; the categorical log-probabilities sum to one over actions."""
    env = envs.make(name)
    policy = maml_rl.default_policy(env, hidden=(8,))
    settings = maml_rl.Settings(trajectories=4, estimator="exact")
    step = maml_rl.make_train_step(env, policy, settings, outer="trpo", max_kl=0.01)
    state = maml_rl.init_state(policy, 0)
    tasks, seed = envs.task_batch(env, 6, seed=0, index=0)
    new, metrics = step(state, (tf.constant(tasks), tf.constant(seed)))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["kl"]) <= 0.01 * 1.001
    moved = sum(float(tf.reduce_sum(tf.abs(a - b))) for a, b in zip(new["weights"],
                                                                     state["weights"]))
    assert moved > 0 or float(metrics["step_fraction"]) == 0.0
    obs = tf.random.stateless_uniform([2, 3, env.observation_dim], [1, 1])
    log_p = policy.distribution(state["weights"], obs)
    np.testing.assert_allclose(tf.reduce_sum(tf.exp(log_p), -1).numpy(), 1.0, rtol=1e-5)
