"""MAML for reinforcement learning (Finn et al. 2017, Algorithm 3) with the exact meta-gradient,
rollouts, inner policy-gradient steps and the TRPO or Adam outer update in one compiled step.

Per task ``T_i`` of a meta-batch: sample ``K`` trajectories with the policy ``f_theta`` (the
environment is a pure TensorFlow function, ``functional_meta.envs``), fit a linear feature
baseline in closed form, take one or more vanilla policy-gradient steps
``theta_i' = theta + alpha grad J_i(theta)``, sample ``K`` trajectories with ``f_theta_i'``, and
update ``theta`` to increase the post-adaptation return summed over tasks. Everything (every
rollout as an XLA ``while`` loop over the horizon with stateless random numbers, the baseline's
least squares, the inner steps, the meta-gradient, conjugate gradient and the line search) is
one ``tf.function(jit_compile=True)``: a step is a pure function of ``(state, tasks, seed)``.

The meta-gradient estimator. The objective is ``J(theta) = E_tau[ V(U(theta, tau)) ]``: ``tau``
the pre-adaptation trajectories, drawn from ``pi_theta``; ``U`` the inner update, a deterministic
function of ``theta`` and ``tau`` (its advantages, fitted baseline and normalisation are functions
of ``tau``); ``V(theta')`` the expected discounted return of ``pi_theta'``. Its gradient has two
parts,

    grad J = E_tau[ dU/dtheta^T grad V(theta') ]  +  E_tau[ V(theta') grad log p(tau; theta) ],

the path through the inner update (second order: the Hessian of the inner surrogate) and the
dependence of the pre-adaptation sampling distribution on ``theta``, which the original MAML code
drops. We use the DiCE form (Foerster et al. 2018) of exactly this decomposition (as ProMP,
Rothfuss et al. 2019, writes it before its low-variance approximation): the surrogate

    S(theta) = sum_t gamma^t box(log pi_theta'(a'_t|s'_t)) A'_t / K
               + (L(theta) - stop(L(theta))) * stop(V_hat' - b)

with ``box(x) = exp(x - stop(x))``, ``L`` the log-likelihood of all pre-adaptation trajectories
(summed over inner steps, each at its own adapted parameters), ``V_hat'`` the mean discounted
return of the post-adaptation trajectories and ``b`` its prediction from the other tasks of the
meta-batch (``leave_one_out_baseline``: independent of this task's samples, so unbiased). Its value is the post-adaptation
policy-gradient surrogate and its gradient at the sampled ``theta`` is an unbiased estimate of
``grad J``; ``tests/test_maml_rl.py`` checks it against a closed form, and that dropping the
second line is off by many standard errors.

``estimator`` chooses the meta-gradient:

- ``'exact'`` (default): ``S`` above, unbiased for ``grad J``. We chose it over applying DiCE's
  box to the inner surrogate (whose Hessian then carries score products, as ProMP's formulation
  writes the sampling term) because that form equals ``grad J`` only to first order in the inner
  step size: it stands ``alpha g^T grad V`` in for ``V(theta')``.
- ``'lvc'``: ProMP's low-variance curvature estimator: no second line; the inner surrogate takes
  ``pi/stop(pi)`` per step, so the inner Hessian gains the per-step score products. Biased, but
  of much lower variance: the second line of ``S`` sums the score of all ``K x H`` pre-adaptation
  steps and multiplies it by a whole return (docs/meta_rl.md measures what that costs in
  training).
- ``'maml'``: no sampling term at all, as the original MAML code differentiates.

The post-adaptation advantages use the fitted baseline but no normalisation, so the two lines of
``S`` are in the same units (the baseline, fitted on the same trajectories, has the usual
O(1/K) bias; ``baseline=False`` removes it). ``first_order=True`` stops the gradient of the
inner step (``dU/dtheta = I``), as FOMAML does. ``inner_steps=0`` is the pretrained baseline of
the paper: a policy trained with the same outer update on all tasks at once, without adaptation.

The outer update: ``outer='adam'`` (ascent on ``S``) or ``outer='trpo'`` (Schulman et al. 2015, as
the paper): the natural gradient by conjugate gradient on Fisher-vector products of the mean KL
divergence between the old and new post-adaptation policies (the adapted parameters recomputed
from ``theta`` on the same pre-adaptation trajectories), scaled to the KL bound ``max_kl``, then a
backtracking line search that accepts the first step with an improved importance-weighted
surrogate and mean KL at most ``max_kl`` (and no step if none does).
"""

import math
from typing import Callable, NamedTuple

import numpy as np
import tensorflow as tf

from functional_meta import envs as envs_lib
from functional_meta import maml, nets, optim

OUTERS = ("trpo", "adam")
ESTIMATORS = ("exact", "lvc", "maml")


def _register_barrier_gradient():
    """XLA's optimisation barrier (``nets`` puts it between kernel gradients under XLA) is an
    identity; TensorFlow registers no gradient for it, which forward-mode products through a
    ``nets`` gradient (``fisher_vector_product_jvp``) need."""
    try:
        tf.RegisterGradient("XlaOptimizationBarrier")(lambda op, *grads: list(grads))
    except KeyError:             # already registered
        pass


_register_barrier_gradient()
LOG_2PI = math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------------------------
# Policies over explicit weights


class Policy(NamedTuple):
    """``init(seed) -> weights``; ``distribution(weights, obs [T, n, d]) -> params``;
    ``noise(shape, seed)``; ``sample(params, noise) -> actions``; ``log_prob(params, actions) ->
    [T, n]``; ``kl(old_params, new_params) -> [T, n]`` (KL(old || new))."""
    init: Callable
    distribution: Callable
    noise: Callable
    sample: Callable
    log_prob: Callable
    kl: Callable
    discrete: bool


def _per_task_row(v, rank):
    """A per-action vector ``[A]`` or per-task ``[T, A]`` reshaped to broadcast against ``rank``-d
    ``[T, n, A]``."""
    return v if v.shape.rank == 1 else tf.reshape(v, [v.shape[0]] + [1] * (rank - 2) + [v.shape[-1]])


def gaussian_mlp_policy(observation_dim, action_dim, hidden=(100, 100), init_log_std=0.0,
                        activation=tf.nn.relu):
    """Diagonal Gaussian policy: mean ``nets.mlp`` of the observation, learned state-independent
    log standard deviations (the MAML paper's policy: two hidden layers of 100 ReLUs). Weights:
    the mlp's, then ``log_std [action_dim]``."""
    init_mlp, apply = nets.mlp([observation_dim, *hidden, action_dim], activation=activation)

    def init(seed, dtype=tf.float32):
        return init_mlp(seed, dtype) + [tf.fill([action_dim], tf.cast(init_log_std, dtype))]

    def distribution(weights, obs):
        mean = apply(weights[:-1], obs)
        return mean, tf.broadcast_to(_per_task_row(weights[-1], mean.shape.rank), mean.shape)

    def noise(shape, seed, dtype=tf.float32):
        return tf.random.stateless_normal(list(shape) + [action_dim], seed, dtype=dtype)

    def sample(params, eps):
        mean, log_std = params
        return mean + tf.exp(log_std) * tf.cast(eps, mean.dtype)

    def log_prob(params, actions):
        mean, log_std = params
        z = (actions - mean) * tf.exp(-log_std)
        return -tf.reduce_sum(0.5 * tf.square(z) + log_std + 0.5 * LOG_2PI, axis=-1)

    def kl(old, new):
        (m0, s0), (m1, s1) = old, new
        return tf.reduce_sum(s1 - s0 + (tf.exp(2 * s0) + tf.square(m0 - m1))
                             / (2 * tf.exp(2 * s1)) - 0.5, axis=-1)

    return Policy(init, distribution, noise, sample, log_prob, kl, False)


def categorical_mlp_policy(observation_dim, num_actions, hidden=(32, 32), activation=tf.nn.relu):
    """Softmax policy over ``num_actions`` with logits ``nets.mlp`` of the observation (bandits,
    tabular MDPs); samples by the Gumbel-max trick on stateless uniform noise."""
    init, apply = nets.mlp([observation_dim, *hidden, num_actions], activation=activation)

    def distribution(weights, obs):
        return tf.nn.log_softmax(apply(weights, obs))

    def noise(shape, seed, dtype=tf.float32):
        u = tf.random.stateless_uniform(list(shape) + [num_actions], seed, minval=1e-12,
                                        maxval=1.0, dtype=dtype)
        return -tf.math.log(-tf.math.log(u))

    def sample(log_p, gumbel):
        return tf.argmax(log_p + tf.cast(gumbel, log_p.dtype), axis=-1, output_type=tf.int32)

    def log_prob(log_p, actions):
        return tf.gather(log_p, actions, batch_dims=log_p.shape.rank - 1)

    def kl(old, new):
        return tf.reduce_sum(tf.exp(old) * (old - new), axis=-1)

    return Policy(init, distribution, noise, sample, log_prob, kl, True)


def default_policy(env, hidden=None):
    """The policy of ``env``'s action space: Gaussian (100, 100) for continuous actions, softmax
    (32, 32) for discrete ones."""
    if env.discrete:
        return categorical_mlp_policy(env.observation_dim, env.action_dim, hidden or (32, 32))
    return gaussian_mlp_policy(env.observation_dim, env.action_dim, hidden or (100, 100))


# ----------------------------------------------------------------------------------------------
# Rollouts, returns, baseline, advantages


class Paths(NamedTuple):
    """``K`` trajectories per task, time last but one: ``obs [T, K, H, d]``, ``actions [T, K, H(,
    A)]``, ``rewards [T, K, H]`` (0 after the end), ``mask [T, K, H]`` (1 up to and including the
    step that ended the episode)."""
    obs: tf.Tensor
    actions: tf.Tensor
    rewards: tf.Tensor
    mask: tf.Tensor


def fold(seed, data):
    """A stateless seed pair derived from ``seed`` and an integer."""
    return tf.random.experimental.stateless_fold_in(tf.convert_to_tensor(seed, tf.int32), data)


def rollout(env, policy, weights, tasks, batch, seed):
    """``batch`` trajectories per task of ``policy`` with (shared or per-task) ``weights``: a
    ``Paths``; one XLA ``while`` loop over the horizon, no gradient through it. After a ``done``
    the environment keeps stepping but the mask is 0 (see ``functional_meta.envs``)."""
    weights = [tf.stop_gradient(w) for w in weights]
    num, horizon = tasks.shape[0], env.horizon
    state = env.reset(tasks, batch, fold(seed, 1))
    noise = policy.noise([horizon, num, batch], fold(seed, 0))
    dtype = weights[0].dtype
    arrays = [tf.TensorArray(d, size=horizon, element_shape=None)
              for d in (dtype, tf.int32 if policy.discrete else dtype, dtype, dtype)]

    def body(t, state, alive, arrays):
        obs = tf.cast(env.observe(state), dtype)
        action = policy.sample(policy.distribution(weights, obs), noise[t])
        state, reward, done = env.step(state, action)
        values = (obs, action, tf.cast(reward, dtype) * alive, alive)
        arrays = [a.write(t, v) for a, v in zip(arrays, values)]
        return t + 1, state, alive * (1 - tf.cast(done, dtype)), arrays

    alive = tf.ones([num, batch], dtype)
    _, _, _, arrays = tf.while_loop(lambda t, *_: t < horizon, body, (0, state, alive, arrays),
                                    maximum_iterations=horizon)

    def batch_major(a):
        x = a.stack()                                     # [H, T, K, ...]
        return tf.transpose(x, [1, 2, 0] + list(range(3, x.shape.rank)))
    return Paths(*[batch_major(a) for a in arrays])


def discounted_returns(rewards, discount):
    """``R_t = sum_{t' >= t} discount^(t'-t) r_t'`` along the last axis (one matrix product)."""
    h = rewards.shape[-1]
    t = np.arange(h)
    gaps = t[:, None] - t[None, :]                     # [t', t]
    matrix = np.where(gaps >= 0, float(discount) ** np.maximum(gaps, 0), 0.0)
    return tf.tensordot(rewards, tf.constant(matrix, rewards.dtype), axes=1)


def baseline_features(paths):
    """rllab's ``LinearFeatureBaseline`` features per step: the observation clipped to [-10, 10],
    its square, ``t/100``, its square and cube, and 1; masked: ``[T, K, H, 2d + 4]``."""
    obs = tf.clip_by_value(paths.obs, -10.0, 10.0)
    shape = paths.mask.shape
    time = tf.broadcast_to(tf.range(shape[-1], dtype=obs.dtype)[:, None] / 100.0,
                           shape + [1])
    features = tf.concat([obs, tf.square(obs), time, time ** 2, time ** 3, tf.ones_like(time)], -1)
    return features * paths.mask[..., None]


def fit_baseline(paths, returns, reg=1e-5):
    """The linear feature baseline fitted per task on its ``K`` trajectories by ridge regression
    in closed form (float64 normal equations, ``reg`` as rllab's), evaluated on them: ``[T, K, H]``."""
    features = baseline_features(paths)
    t, k, h, f = features.shape
    x = tf.cast(tf.reshape(features, [t, k * h, f]), tf.float64)
    y = tf.cast(tf.reshape(returns * paths.mask, [t, k * h, 1]), tf.float64)
    gram = tf.matmul(x, x, transpose_a=True) + reg * tf.eye(f, dtype=tf.float64)
    coef = tf.linalg.solve(gram, tf.matmul(x, y, transpose_a=True))
    fitted = tf.reshape(tf.matmul(x, coef), [t, k, h])
    return tf.cast(fitted, returns.dtype) * paths.mask


def advantages(paths, discount, baseline=True, normalize=False):
    """``R_t - b_t`` per step (GAE with lambda 1, as the MAML code), 0 after the end;
    ``normalize``: centred and scaled to unit standard deviation per task over its valid steps."""
    returns = discounted_returns(paths.rewards, discount)
    adv = returns - fit_baseline(paths, returns) if baseline else returns * paths.mask
    if normalize:
        count = tf.reduce_sum(paths.mask, [1, 2], keepdims=True)
        mean = tf.reduce_sum(adv, [1, 2], keepdims=True) / count
        var = tf.reduce_sum(tf.square(adv - mean) * paths.mask, [1, 2], keepdims=True) / count
        adv = (adv - mean) / (tf.sqrt(var) + 1e-8) * paths.mask
    return tf.stop_gradient(adv)


def log_probs(policy, weights, paths):
    """``log pi(a_t|s_t)`` of every step: ``[T, K, H]`` (not masked)."""
    t, k, h = paths.mask.shape
    obs = tf.reshape(paths.obs, [t, k * h, paths.obs.shape[-1]])
    actions = tf.reshape(paths.actions, [t, k * h] + paths.actions.shape[3:])
    return tf.reshape(policy.log_prob(policy.distribution(weights, obs), actions), [t, k, h])


def distributions(policy, weights, paths):
    t, k, h = paths.mask.shape
    return policy.distribution(weights, tf.reshape(paths.obs, [t, k * h, paths.obs.shape[-1]]))


def mean_return(paths):
    """Undiscounted return per trajectory, averaged per task: ``[T]``."""
    return tf.reduce_mean(tf.reduce_sum(paths.rewards, -1), -1)


# ----------------------------------------------------------------------------------------------
# The algorithm


class Settings(NamedTuple):
    """Hyper-parameters of ``meta_surrogate`` (the MAML paper's 2D navigation defaults)."""
    trajectories: int = 20          # K per task and inner step, and after adaptation
    inner_steps: int = 1
    inner_lr: float = 0.1
    discount: float = 0.99
    first_order: bool = False
    estimator: str = "exact"        # 'exact' | 'lvc' | 'maml' (see the module docstring)
    baseline: bool = True
    normalize_inner: bool = True


def inner_surrogate(log_p, adv, mask, box=False):
    """Per task, the vanilla policy-gradient surrogate of the MAML code: the mean over valid steps
    of ``log pi(a_t|s_t) * A_t``; its gradient is the inner step's direction. ``box=True``
    (ProMP's LVC): ``pi/stop(pi)`` in place of ``log pi``, the same value and gradient, with the
    per-step score products in its Hessian. ``[T]``."""
    if box:
        log_p = tf.exp(log_p - tf.stop_gradient(log_p))
    return tf.reduce_sum(log_p * adv * mask, [1, 2]) / tf.reduce_sum(mask, [1, 2])


def adapt_step(policy, theta, paths, adv, settings):
    """``theta_i' = theta_i + alpha grad J_i(theta_i)`` for every task at once (per-task weights;
    ``maml.inner_step`` with minus the surrogate as the loss)."""
    def loss(log_p, _):
        return -inner_surrogate(log_p, adv, paths.mask, settings.estimator == "lvc")
    return maml.inner_step(lambda w, p: log_probs(policy, w, p), theta, paths, None,
                           [settings.inner_lr] * len(theta), loss, settings.first_order)


class Samples(NamedTuple):
    """The trajectories of one meta-step: before each inner step (``pre``: a list of
    ``(paths, advantages)``) and after adaptation (``post``, ``post_adv``), and the tasks."""
    pre: list
    post: Paths
    post_adv: tf.Tensor
    tasks: tf.Tensor


def sample(env, policy, weights, tasks, seed, settings):
    """Algorithm 3, lines 4-8: every rollout of a meta-step (no gradient is taken through it)."""
    theta = maml.per_task(weights, tasks.shape[0])
    pre = []
    for i in range(settings.inner_steps):
        paths = rollout(env, policy, theta, tasks, settings.trajectories, fold(seed, i))
        adv = advantages(paths, settings.discount, settings.baseline, settings.normalize_inner)
        pre.append((paths, adv))
        theta = [tf.stop_gradient(w) for w in adapt_step(policy, theta, paths, adv, settings)]
    post = rollout(env, policy, theta, tasks, settings.trajectories,
                   fold(seed, settings.inner_steps))
    post_adv = advantages(post, settings.discount, settings.baseline, normalize=False)
    return Samples(pre, post, post_adv, tasks)


def adapted_weights(policy, weights, samples, settings):
    """The per-task adapted weights ``U(theta, tau)`` recomputed from ``weights`` on the stored
    pre-adaptation trajectories."""
    theta = maml.per_task(weights, samples.post.mask.shape[0])
    for paths, adv in samples.pre:
        theta = adapt_step(policy, theta, paths, adv, settings)
    return theta


def meta_surrogate(policy, weights, samples, settings, old_log_p=None):
    """The surrogate ``S(theta)`` of the module docstring, averaged over tasks, and the adapted
    policies' distributions on the post-adaptation states.

    The inner steps are recomputed from ``weights`` on the stored pre-adaptation trajectories (so
    a tape sees ``theta' = U(theta, tau)``). ``old_log_p`` (``[T, K, H]``): the line search's
    importance weights ``pi_theta'/pi_old``; ``None``: the box ``exp(x - stop(x))``, whose value
    is 1 at the sampled parameters. Returns ``(S, distribution params, log_p)``.
    """
    theta = maml.per_task(weights, samples.post.mask.shape[0])
    likelihood = 0.0
    for paths, adv in samples.pre:                     # lines 5-7: adapt, step by step
        likelihood += tf.reduce_sum(log_probs(policy, theta, paths) * paths.mask, [1, 2])
        theta = adapt_step(policy, theta, paths, adv, settings)
    post = samples.post
    log_p = log_probs(policy, theta, post)
    old = tf.stop_gradient(log_p) if old_log_p is None else old_log_p
    discounts = tf.constant(float(settings.discount) ** np.arange(post.mask.shape[-1]),
                            log_p.dtype)
    weighted = tf.exp(log_p - old) * samples.post_adv * discounts * post.mask
    objective = tf.reduce_mean(tf.reduce_sum(weighted, -1), -1)             # line 10, per task
    if settings.estimator == "exact" and samples.pre:
        value = tf.reduce_mean(tf.reduce_sum(post.rewards * discounts, -1), -1)
        others = leave_one_out_baseline(samples.tasks, value)
        objective += (likelihood - tf.stop_gradient(likelihood)) * tf.stop_gradient(value - others)
    return tf.reduce_mean(objective), distributions(policy, theta, post), log_p


def leave_one_out_baseline(tasks, values, reg=1e-3):
    """Per task, the prediction of its value from the *other* tasks of the meta-batch: ridge
    regression of ``values [T]`` on the task parameters' features ``[1, task, task^2]``, left out
    in closed form (``y_i - (y_i - yhat_i) / (1 - h_ii)`` with ``h`` the hat matrix). It never
    uses task ``i``'s trajectories, so it is a valid baseline for the sampling-distribution term
    (no bias). With fewer than twice as many tasks as features (e.g. tabular MDPs) it is the
    mean of the other tasks' values; with one task it is 0."""
    count = values.shape[0]
    if count < 2:
        return tf.zeros_like(values)
    tasks = tf.cast(tasks, tf.float64)
    x = tf.ones([count, 1], tf.float64)
    if count >= 2 * (2 * tasks.shape[1] + 1):
        x = tf.concat([x, tasks, tf.square(tasks)], 1)
    gram = tf.matmul(x, x, transpose_a=True) + reg * tf.eye(x.shape[1], dtype=tf.float64)
    hat = tf.matmul(x, tf.linalg.solve(gram, tf.transpose(x)))
    y = tf.cast(values, tf.float64)
    fitted = tf.linalg.matvec(hat, y)
    leverage = tf.minimum(tf.linalg.diag_part(hat), 1.0 - 1e-6)
    return tf.cast(y - (y - fitted) / (1.0 - leverage), values.dtype)


def meta_gradient(env, policy, weights, tasks, seed, settings):
    """One sample of the meta-gradient (the gradient of ``S``) and the samples it came from."""
    samples = sample(env, policy, weights, tasks, seed, settings)
    with tf.GradientTape() as tape:
        tape.watch(weights)
        objective, _, _ = meta_surrogate(policy, weights, samples, settings)
    return tape.gradient(objective, weights), samples


# ----------------------------------------------------------------------------------------------
# TRPO


def _flat(tensors):
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], 0)


def _unflat(vector, like):
    out, i = [], 0
    for t in like:
        n = int(np.prod(t.shape))
        out.append(tf.reshape(vector[i:i + n], t.shape))
        i += n
    return out


def fisher_vector_product_jvp(adapt_fn, kl_fn, weights, damping=0.0):
    """``v -> J^T F J v + damping v``: the same product as ``fisher_vector_product`` of
    ``kl_fn(adapt_fn(weights))`` at the old policy (where the KL's gradient is 0, so its Hessian is
    ``J^T F J``), with ``J`` the Jacobian of the inner adaptation ``adapt_fn`` (a forward-mode
    product, then a reverse one) and ``F`` the Hessian of ``kl_fn`` in the adapted weights. Cheaper:
    no third derivative through the inner steps."""
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(weights)
        adapted = adapt_fn(weights)
    adapted_fixed = [tf.stop_gradient(a) for a in adapted]
    fisher = fisher_vector_product(kl_fn, adapted_fixed)

    def product(vector):
        with tf.autodiff.ForwardAccumulator(weights, _unflat(vector, weights)) as acc:
            forward = adapt_fn(weights)
        jv = acc.jvp(forward, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        fjv = _unflat(fisher(_flat(jv)), adapted_fixed)
        back = tape.gradient(adapted, weights, output_gradients=fjv,
                             unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return _flat(back) + damping * vector
    return product


def fisher_vector_product(kl_fn, weights, damping=0.0):
    """``v -> H v + damping v`` with ``H`` the Hessian of ``kl_fn(weights)`` at ``weights`` (at the
    old policy: the Fisher matrix of the mapping to the policy), by double back-propagation."""
    def product(vector):
        with tf.GradientTape() as outer:
            outer.watch(weights)
            with tf.GradientTape() as inner:
                inner.watch(weights)
                kl = kl_fn(weights)
            grads = inner.gradient(kl, weights)
            dot = tf.reduce_sum(_flat(grads) * tf.stop_gradient(vector))
        hv = outer.gradient(dot, weights, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return _flat(hv) + damping * vector
    return product


def line_search(evaluate, weights, full_step, max_kl, backtracks=15, ratio=0.8):
    """Backtracking: the first ``weights + ratio^j full_step`` (``j < backtracks``) whose
    ``evaluate(w) -> (improvement, kl)`` has ``improvement > 0`` and ``kl <= max_kl``; ``weights``
    if none. Returns ``(weights, accepted step fraction (0 if none), kl)``."""
    dtype = weights[0].dtype

    def candidate(j):
        scale = tf.pow(tf.constant(ratio, dtype), tf.cast(j, dtype))
        return [w + scale * s for w, s in zip(weights, full_step)], scale

    def body(j, done, fraction, kl):
        trial, scale = candidate(j)
        improve, trial_kl = evaluate(trial)
        ok = tf.logical_and(improve > 0, trial_kl <= max_kl)
        return (j + 1, ok, tf.where(ok, scale, fraction), tf.where(ok, trial_kl, kl))

    zero = tf.zeros([], dtype)
    _, _, fraction, kl = tf.while_loop(
        lambda j, done, *_: tf.logical_and(j < backtracks, tf.logical_not(done)), body,
        (tf.constant(0), tf.constant(False), zero, zero), maximum_iterations=backtracks)
    return [w + fraction * s for w, s in zip(weights, full_step)], fraction, kl


def trpo_update(policy, weights, samples, settings, max_kl=0.01, damping=1e-5, cg_iters=10,
                backtracks=15, ratio=0.8, fisher="jvp"):
    """One TRPO step on the meta-objective: ``(weights, metrics)``. ``fisher``: how the
    Fisher-vector products are computed, ``'jvp'`` (``fisher_vector_product_jvp``) or
    ``'hessian'`` (``fisher_vector_product`` of the KL through the adaptation); equal values."""
    with tf.GradientTape() as tape:
        tape.watch(weights)
        objective, old_params, old_log_p = meta_surrogate(policy, weights, samples, settings)
    grad = _flat(tape.gradient(objective, weights))
    old_params = tf.nest.map_structure(tf.stop_gradient, old_params)
    old_log_p = tf.stop_gradient(old_log_p)
    mask = samples.post.mask
    valid = tf.reshape(mask, [mask.shape[0], -1])

    def mean_kl(params):
        return tf.reduce_sum(policy.kl(old_params, params) * valid) / tf.reduce_sum(valid)

    if fisher == "jvp":
        fvp = fisher_vector_product_jvp(
            lambda w: adapted_weights(policy, w, samples, settings),
            lambda theta: mean_kl(distributions(policy, theta, samples.post)), weights, damping)
    else:
        fvp = fisher_vector_product(
            lambda w: mean_kl(meta_surrogate(policy, w, samples, settings, old_log_p)[1]),
            weights, damping)
    direction = optim.conjugate_gradient(fvp, grad, cg_iters)
    shs = tf.reduce_sum(direction * fvp(direction))
    step = direction * tf.sqrt(2.0 * max_kl / tf.maximum(shs, 1e-20))
    baseline_value = tf.stop_gradient(objective)
    plain = settings._replace(estimator="maml")

    def evaluate(w):
        value, params, _ = meta_surrogate(policy, w, samples, plain, old_log_p)
        return value - baseline_value, mean_kl(params)

    new, fraction, kl = line_search(evaluate, weights, _unflat(step, weights), max_kl,
                                    backtracks, ratio)
    return new, {"step_fraction": fraction, "kl": kl}


# ----------------------------------------------------------------------------------------------
# The compiled training step


def check_settings(env, settings, outer="trpo"):
    """``ValueError`` naming the setting and its allowed range; run before anything compiles."""
    for name in ("trajectories",):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} (K, trajectories per task) must be a positive integer, "
                             f"got {value!r}")
    steps = settings.inner_steps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"inner_steps must be a non-negative integer (0: the pretrained "
                         f"baseline), got {steps!r}")
    if not (isinstance(settings.inner_lr, (int, float)) and settings.inner_lr > 0):
        raise ValueError(f"inner_lr must be a positive number, got {settings.inner_lr!r}")
    if not (isinstance(settings.discount, (int, float)) and 0 < settings.discount <= 1):
        raise ValueError(f"discount must be in (0, 1], got {settings.discount!r}")
    if settings.baseline and settings.trajectories * env.horizon < 2 * env.observation_dim + 4:
        raise ValueError(f"trajectories={settings.trajectories} x horizon={env.horizon} steps "
                         f"per task cannot fit the {2 * env.observation_dim + 4}-feature "
                         "baseline; use more trajectories or baseline=False")
    if settings.normalize_inner and settings.trajectories * env.horizon < 2:
        raise ValueError("normalize_inner needs at least two steps per task (trajectories x "
                         "horizon >= 2)")
    if settings.estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {list(ESTIMATORS)}, got {settings.estimator!r}")
    if outer not in OUTERS:
        raise ValueError(f"outer must be one of {list(OUTERS)}, got {outer!r}")


def init_state(policy, seed, outer="trpo"):
    """``{'weights', 'opt'}``: the policy's weights and Adam's state (a step count for TRPO)."""
    weights = policy.init(seed)
    opt = optim.adam_init(weights) if outer == "adam" else (tf.zeros([], tf.int64),)
    return {"weights": weights, "opt": opt}


def make_train_step(env, policy, settings=Settings(), *, outer="trpo", outer_lr=1e-2,
                    max_kl=0.01, jit_compile=True):
    """The whole meta-training step as one compiled function:
    ``step(state, (tasks, seed)) -> (state, metrics)``.

    ``metrics``: ``loss`` (minus the mean undiscounted return after adaptation), ``return_pre``
    and ``return_post`` (mean undiscounted returns before the first and after the last inner
    step), and for TRPO ``kl`` and ``step_fraction``. Example::

        env = envs.navigation2d()
        policy = maml_rl.default_policy(env)
        step = maml_rl.make_train_step(env, policy, maml_rl.Settings(trajectories=20))
        state = maml_rl.init_state(policy, seed=0)
        state, metrics = step(state, envs.task_batch(env, 20, seed=0, index=0))
    """
    check_settings(env, settings, outer)

    @tf.function(jit_compile=jit_compile, autograph=False)
    def step(state, batch):
        tasks, seed = batch
        weights = list(state["weights"])
        samples = sample(env, policy, weights, tasks, seed, settings)
        before = samples.pre[0][0] if samples.pre else samples.post
        metrics = {"loss": -tf.reduce_mean(mean_return(samples.post)),
                   "return_pre": tf.reduce_mean(mean_return(before)),
                   "return_post": tf.reduce_mean(mean_return(samples.post))}
        if outer == "trpo":
            weights, extra = trpo_update(policy, weights, samples, settings, max_kl)
            metrics.update(extra)
            opt = (state["opt"][0] + 1,)
        else:
            with tf.GradientTape() as tape:
                tape.watch(weights)
                objective, _, _ = meta_surrogate(policy, weights, samples, settings)
            grads = [-g for g in tape.gradient(objective, weights)]
            weights, opt = optim.adam_update(grads, weights, state["opt"], outer_lr)
        return {"weights": weights, "opt": opt}, metrics

    return step


def make_evaluator(env, policy, settings=Settings(), *, max_steps=3, jit_compile=True):
    """``evaluate(weights, tasks, seed) -> (returns [max_steps + 1, T], positions)``: the mean
    undiscounted return per task before adaptation and after each of ``max_steps`` inner
    policy-gradient steps (first order: nothing is differentiated through them), and the
    observations of every stage's trajectories ``[max_steps + 1, T, K, H, d]`` (for figures)."""
    check_settings(env, settings)

    @tf.function(jit_compile=jit_compile, autograph=False)
    def evaluate(weights, tasks, seed):
        theta = maml.per_task(list(weights), tasks.shape[0])
        returns, observations = [], []
        for i in range(max_steps + 1):
            paths = rollout(env, policy, theta, tasks, settings.trajectories, fold(seed, i))
            returns.append(mean_return(paths))
            observations.append(paths.obs)
            if i < max_steps:
                adv = advantages(paths, settings.discount, settings.baseline,
                                 settings.normalize_inner)
                theta = [tf.stop_gradient(w) for w in adapt_step(policy, theta, paths, adv,
                                                                 settings)]
        return tf.stack(returns), tf.stack(observations)

    return evaluate


def evaluate_returns(evaluate, weights, env, num_tasks, seed=0, batch=25):
    """Per-task returns ``[max_steps + 1, num_tasks]`` (numpy) of ``evaluate`` on held-out tasks:
    the task batches ``0, 1, ...`` of ``TaskSampler(env, batch, seed)`` (use a seed apart from
    training's), the last one cut."""
    sampler = envs_lib.TaskSampler(env, batch, seed)
    out = []
    for index in range(-(-num_tasks // batch)):
        tasks, pair = sampler.batch(index)
        returns, _ = evaluate(weights, tf.constant(tasks), tf.constant(pair))
        out.append(np.asarray(returns))
    return np.concatenate(out, axis=1)[:, :num_tasks]
