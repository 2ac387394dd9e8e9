"""Reinforcement-learning task families as pure TensorFlow functions, batched over tasks and
trajectories, with static shapes (so a whole rollout compiles into one XLA loop).

An ``Env`` is a tuple of functions over explicit state:

- ``sample_tasks(rng, num) -> [num, task_dim]`` float32 numpy task parameters (goals, arm
  probabilities, ...), from a ``numpy.random.Generator``;
- ``reset(tasks [T, task_dim], batch, seed) -> state``: ``batch`` trajectories per task;
- ``step(state, action) -> (state, reward [T, B], done [T, B] bool)``;
- ``observe(state) -> [T, B, observation_dim]`` float32.

``seed`` is a stateless seed pair (``[2]`` int32); an environment with random rewards or
transitions draws them with ``tf.random.stateless_*`` from it and the step count, so a rollout is
a pure function of the policy, the tasks and the seed. ``TaskSampler`` gives a training loop the
tasks of step ``i`` and that step's seed pair as a pure function of ``(seed, i)``, like
``functional_meta.episodes``; resuming is exact.

Families:

- ``navigation2d``: the 2D navigation of the MAML paper (Finn et al. 2017, sec. 5.3), as its
  authors' code (``maml_rl``, ``PointEnvRandGoal`` inside rllab's ``normalize`` wrapper) defines
  it: the point starts at the origin; goals are uniform in ``[-0.5, 0.5]^2``; the policy's action
  ``a`` moves the point by ``clip(0.1 * a, -0.1, 0.1)`` per axis (``normalize`` maps the policy's
  ``[-1, 1]`` onto the ``[-0.1, 0.1]`` action box and clips); the observation is the new position;
  the reward is minus the Euclidean distance from the new position to the goal; the episode ends
  when the point is within 0.01 of the goal on both axes, or after the horizon (100).
- ``bandit``: Bernoulli multi-armed bandits (Duan et al. 2016, RL^2): arm probabilities uniform in
  ``[0, 1]``, a constant observation, reward 1 with the pulled arm's probability.
- ``tabular_mdp``: random tabular MDPs (Duan et al. 2016): transitions ``Dirichlet(1, ..., 1)`` per
  state and action, mean rewards ``N(1, 1)``, observed rewards ``N(mean, 1)``, start in state 0,
  one-hot observations, horizon 10.

Fixed shapes and termination: a trajectory never stops early inside the compiled loop; the
rollout (``functional_meta.maml_rl.rollout``) carries an ``alive`` mask that turns 0 after the
first ``done``, and every reward, log-probability and baseline feature after it is multiplied by
the mask. That gives exactly the sums the authors' variable-length paths give.
"""

from typing import Callable, NamedTuple

import numpy as np
import tensorflow as tf

from functional_meta import episodes


class Env(NamedTuple):
    """A task family; see the module docstring for the functions' contracts."""
    name: str
    observation_dim: int
    action_dim: int          # continuous: action dimensions; discrete: number of actions
    discrete: bool
    horizon: int
    task_dim: int
    sample_tasks: Callable
    reset: Callable
    step: Callable
    observe: Callable


# ----------------------------------------------------------------------------------------------
# 2D navigation (MAML paper, sec. 5.3)

NAV_GOAL_RANGE = 0.5
NAV_ACTION_SCALE = 0.1     # rllab's normalize: policy action in [-1, 1] -> [-0.1, 0.1]
NAV_ACTION_LIMIT = 0.1
NAV_DONE_DISTANCE = 0.01


def navigation2d(horizon=100):
    """2D point navigation to a goal (see the module docstring). State: ``(position, goal)``,
    both ``[T, B, 2]``."""
    _check_horizon(horizon)

    def sample_tasks(rng, num):
        return rng.uniform(-NAV_GOAL_RANGE, NAV_GOAL_RANGE, size=(num, 2)).astype(np.float32)

    def reset(tasks, batch, seed=None):
        tasks = tf.convert_to_tensor(tasks, tf.float32)
        goal = tf.broadcast_to(tasks[:, None, :], [tasks.shape[0], batch, 2])
        return (tf.zeros_like(goal), goal)

    def step(state, action):
        position, goal = state
        move = tf.clip_by_value(NAV_ACTION_SCALE * tf.cast(action, tf.float32),
                                -NAV_ACTION_LIMIT, NAV_ACTION_LIMIT)
        position = position + move
        offset = position - goal
        reward = -tf.norm(offset, axis=-1)
        done = tf.reduce_all(tf.abs(offset) < NAV_DONE_DISTANCE, axis=-1)
        return (position, goal), reward, done

    return Env("navigation2d", 2, 2, False, int(horizon), 2, sample_tasks, reset, step,
               lambda state: state[0])


# ----------------------------------------------------------------------------------------------
# Simulator-free families of Duan et al. (RL^2)


def bandit(arms=5, horizon=10):
    """Bernoulli ``arms``-armed bandits. State: ``(probabilities [T, B, arms], t, seed)``."""
    episodes.check_positive(arms=arms)
    _check_horizon(horizon)

    def sample_tasks(rng, num):
        return rng.uniform(0.0, 1.0, size=(num, arms)).astype(np.float32)

    def reset(tasks, batch, seed):
        tasks = tf.convert_to_tensor(tasks, tf.float32)
        probs = tf.broadcast_to(tasks[:, None, :], [tasks.shape[0], batch, arms])
        return (probs, tf.constant(0, tf.int32), tf.convert_to_tensor(seed, tf.int32))

    def step(state, action):
        probs, t, seed = state
        p = tf.gather(probs, action, batch_dims=2)
        u = tf.random.stateless_uniform(p.shape, _fold(seed, t))
        reward = tf.cast(u < p, tf.float32)
        return (probs, t + 1, seed), reward, tf.zeros(p.shape, tf.bool)

    def observe(state):
        return tf.ones(state[0].shape[:2] + [1], tf.float32)

    return Env(f"bandit{arms}", 1, arms, True, int(horizon), arms, sample_tasks, reset, step,
               observe)


def tabular_mdp(states=10, actions=5, horizon=10):
    """Random tabular MDPs. Task vector: transition probabilities ``[S, A, S]`` then mean rewards
    ``[S, A]``, flattened. State: ``(s [T, B] int32, tasks, t, seed)``."""
    episodes.check_positive(states=states, actions=actions)
    _check_horizon(horizon)
    n_transitions = states * actions * states

    def sample_tasks(rng, num):
        transitions = rng.dirichlet(np.ones(states), size=(num, states, actions))
        means = rng.normal(1.0, 1.0, size=(num, states, actions))
        return np.concatenate([transitions.reshape(num, -1), means.reshape(num, -1)],
                              axis=1).astype(np.float32)

    def reset(tasks, batch, seed):
        tasks = tf.convert_to_tensor(tasks, tf.float32)
        s = tf.zeros([tasks.shape[0], batch], tf.int32)
        return (s, tasks, tf.constant(0, tf.int32), tf.convert_to_tensor(seed, tf.int32))

    def step(state, action):
        s, tasks, t, seed = state
        num, batch = s.shape
        transitions = tf.reshape(tasks[:, :n_transitions], [num, states * actions, states])
        means = tf.reshape(tasks[:, n_transitions:], [num, states * actions])
        index = s * actions + tf.cast(action, tf.int32)                       # [T, B]
        mean = tf.gather(means, index, batch_dims=1)
        probs = tf.gather(transitions, index, batch_dims=1)                   # [T, B, S]
        step_seed = _fold(seed, t)
        reward = mean + tf.random.stateless_normal(mean.shape, _fold(step_seed, 0))
        u = tf.random.stateless_uniform([num, batch, 1], _fold(step_seed, 1))
        # Inverse-CDF sampling of the next state (the count of CDF values not above u).
        cdf = tf.cumsum(probs, axis=-1)
        following = tf.minimum(tf.reduce_sum(tf.cast(cdf <= u, tf.int32), -1), states - 1)
        return (following, tasks, t + 1, seed), reward, tf.zeros([num, batch], tf.bool)

    def observe(state):
        return tf.one_hot(state[0], states, dtype=tf.float32)

    return Env(f"tabular_mdp{states}x{actions}", states, actions, True, int(horizon),
               n_transitions + states * actions, sample_tasks, reset, step, observe)


ENVS = {"navigation2d": navigation2d, "bandit": bandit, "tabular_mdp": tabular_mdp}
DEFAULT_HORIZONS = {"navigation2d": 100, "bandit": 10, "tabular_mdp": 10}


def make(name, horizon=None):
    """The task family ``name`` (one of ``ENVS``) with ``horizon`` (default: the paper's)."""
    if name not in ENVS:
        raise ValueError(f"env must be one of {sorted(ENVS)}, got {name!r}")
    return ENVS[name](horizon=DEFAULT_HORIZONS[name] if horizon is None else horizon)


def _fold(seed, data):
    return tf.random.experimental.stateless_fold_in(seed, data)


def _check_horizon(horizon):
    if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon < 1:
        raise ValueError(f"horizon must be a positive integer (time steps), got {horizon!r}")


# ----------------------------------------------------------------------------------------------
# Task batches for a training loop


def task_batch(env, meta_batch, seed, index):
    """Step ``index``'s ``(tasks [meta_batch, task_dim] float32, seed pair [2] int32)``, a pure
    function of ``(seed, index)``."""
    rng = np.random.default_rng([int(seed), int(index)])
    tasks = env.sample_tasks(rng, meta_batch)
    return tasks, rng.integers(0, 2 ** 31 - 1, size=2).astype(np.int32)


class TaskSampler(episodes.IndexedSampler):
    """``EpisodeSampler``'s interface for RL tasks: batch ``i`` is ``task_batch(env, meta_batch,
    seed, i)``; the state is the seed and the index of the next batch (``training.train`` and
    ``episodes.dataset`` use it as they use the episode samplers)."""

    def __init__(self, env, meta_batch, seed=0):
        episodes.check_positive(meta_batch=meta_batch)
        episodes.check_seed(seed)
        self.env, self.meta_batch, self.seed = env, int(meta_batch), int(seed)
        self._next = 0

    def batch(self, index):
        return task_batch(self.env, self.meta_batch, self.seed, index)

    def signature(self):
        return (tf.TensorSpec((self.meta_batch, self.env.task_dim), tf.float32),
                tf.TensorSpec((2,), tf.int32))
