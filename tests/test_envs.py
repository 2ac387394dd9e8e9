"""The RL task families (functional_meta.envs) and rollouts against reference loops in numpy."""

import numpy as np
import pytest
import tensorflow as tf

from functional_meta import envs, maml_rl


def _navigation_reference(goal, actions):
    """The authors' point environment, one trajectory: ``actions [H, 2]`` ->
    ``(positions, rewards, dones)``."""
    position = np.zeros(2)
    positions, rewards, dones = [], [], []
    for a in actions:
        position = position + np.clip(0.1 * a, -0.1, 0.1)
        x, y = position - goal
        positions.append(position.copy())
        rewards.append(-np.sqrt(x ** 2 + y ** 2))
        dones.append(abs(x) < 0.01 and abs(y) < 0.01)
    return np.array(positions), np.array(rewards), np.array(dones)


def test_navigation_step_matches_reference_loop():
    env = envs.navigation2d(horizon=30)
    rng = np.random.default_rng(0)
    goals = env.sample_tasks(rng, 3)
    assert goals.shape == (3, 2) and np.all(np.abs(goals) <= 0.5)
    actions = rng.normal(0.0, 1.5, size=(30, 3, 4, 2)).astype(np.float32)  # often clipped
    state = env.reset(goals, 4)
    np.testing.assert_array_equal(env.observe(state), np.zeros((3, 4, 2)))
    got = []
    for a in actions:
        state, reward, done = env.step(state, tf.constant(a))
        got.append((env.observe(state).numpy(), reward.numpy(), done.numpy()))
    for task in range(3):
        for traj in range(4):
            positions, rewards, dones = _navigation_reference(goals[task], actions[:, task, traj])
            np.testing.assert_allclose([g[0][task, traj] for g in got], positions, atol=1e-6)
            np.testing.assert_allclose([g[1][task, traj] for g in got], rewards, atol=1e-6)
            np.testing.assert_array_equal([g[2][task, traj] for g in got], dones)


def test_rollout_masks_after_reaching_the_goal_and_matches_reference():
    """A linear Gaussian policy with known weights: the rollout equals a numpy loop with the same
    noise, and everything after the step that reaches the goal (done) is masked."""
    env = envs.navigation2d(horizon=12)
    policy = maml_rl.gaussian_mlp_policy(2, 2, hidden=())
    w = np.array([[0.0, 0.0], [0.0, 0.0]], np.float32)
    b = np.array([0.04, 0.0], np.float32)               # moves 0.004 to the right per step
    weights = [tf.constant(w), tf.constant(b), tf.constant([-30.0, -30.0])]
    goals = np.array([[0.02, 0.0], [0.3, -0.2]], np.float32)
    seed = tf.constant([3, 4], tf.int32)
    paths = maml_rl.rollout(env, policy, weights, tf.constant(goals), 2, seed)
    mask = paths.mask.numpy()
    # Task 0: positions 0.004, 0.008, 0.012 (0.008 from the goal: done at t = 2).
    np.testing.assert_array_equal(mask[0], [[1, 1, 1] + [0] * 9] * 2)
    np.testing.assert_array_equal(mask[1], np.ones((2, 12)))
    noise = policy.noise([12, 2, 2], maml_rl.fold(seed, 0)).numpy()
    for task in range(2):
        for traj in range(2):
            position, alive = np.zeros(2), 1.0
            for t in range(12):
                np.testing.assert_allclose(paths.obs[task, traj, t], position, atol=1e-6)
                action = position @ w + b + np.exp(-30.0) * noise[t, task, traj]
                np.testing.assert_allclose(paths.actions[task, traj, t], action, atol=1e-6)
                position = position + np.clip(0.1 * action, -0.1, 0.1)
                offset = position - goals[task]
                np.testing.assert_allclose(paths.rewards[task, traj, t],
                                           -np.linalg.norm(offset) * alive, atol=1e-6)
                alive *= 0.0 if np.all(np.abs(offset) < 0.01) else 1.0


def test_bandit_rewards_are_bernoulli_with_the_arm_probabilities():
    env = envs.bandit(arms=3, horizon=400)
    probs = np.array([[0.1, 0.5, 0.9]], np.float32)
    state = env.reset(probs, 3, tf.constant([1, 2]))
    np.testing.assert_array_equal(env.observe(state), np.ones((1, 3, 1)))
    action = tf.constant([[0, 1, 2]], tf.int32)
    rewards = []
    for _ in range(400):
        state, reward, done = env.step(state, action)
        assert not done.numpy().any()
        rewards.append(reward.numpy()[0])
    rewards = np.array(rewards)
    assert set(np.unique(rewards)) <= {0.0, 1.0}
    se = np.sqrt(probs[0] * (1 - probs[0]) / 400)
    assert np.all(np.abs(rewards.mean(0) - probs[0]) < 4 * se), rewards.mean(0)
    again = env.reset(probs, 3, tf.constant([1, 2]))     # same seed, same rewards
    _, first, _ = env.step(again, action)
    np.testing.assert_array_equal(first.numpy()[0], rewards[0])


def test_tabular_mdp_transitions_and_rewards_follow_the_task():
    """Next-state frequencies and mean rewards from state 0 against the task's tables (numpy)."""
    env = envs.tabular_mdp(states=4, actions=2, horizon=10)
    task = env.sample_tasks(np.random.default_rng(5), 1)
    transitions = task[0, :32].reshape(4, 2, 4)
    means = task[0, 32:].reshape(4, 2)
    np.testing.assert_allclose(transitions.sum(-1), 1.0, atol=1e-5)
    n = 4000
    state = env.reset(task, n, tf.constant([7, 8]))
    np.testing.assert_array_equal(env.observe(state).numpy()[0, :, 0], np.ones(n))
    action = tf.ones([1, n], tf.int32)
    state, reward, _ = env.step(state, action)
    counts = np.bincount(state[0].numpy()[0], minlength=4) / n
    se = np.sqrt(transitions[0, 1] * (1 - transitions[0, 1]) / n) + 1e-3
    assert np.all(np.abs(counts - transitions[0, 1]) < 4 * se), (counts, transitions[0, 1])
    assert abs(reward.numpy().mean() - means[0, 1]) < 4 / np.sqrt(n)


def test_task_batches_are_pure_functions_of_seed_and_index():
    env = envs.navigation2d()
    a = envs.task_batch(env, 5, seed=1, index=7)
    b = envs.task_batch(env, 5, seed=1, index=7)
    c = envs.task_batch(env, 5, seed=1, index=8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    sampler = envs.TaskSampler(env, 5, seed=1)
    sampler.set_state({"seed": 1, "next_batch": 7})
    np.testing.assert_array_equal(sampler.sample()[0], a[0])
    assert sampler.get_state() == {"seed": 1, "next_batch": 8}


@pytest.mark.parametrize("call, message", [
    (lambda: envs.make("cartpole"), "env must be one of"),
    (lambda: envs.make("navigation2d", horizon=0), "horizon must be a positive integer"),
    (lambda: envs.bandit(arms=0), "arms must be a positive integer"),
    (lambda: envs.TaskSampler(envs.navigation2d(), 0), "meta_batch must be a positive"),
])
def test_bad_arguments_fail_clearly(call, message):
    with pytest.raises(ValueError, match=message):
        call()
