"""The functional Adam and its learning-rate schedule, against a hand computation."""

import numpy as np
import pytest
import tensorflow as tf

from functional_meta import optim


def _numpy_adam(grads, w, rates, beta1=0.9, beta2=0.999, eps=1e-8):
    """Adam (Kingma & Ba, Algorithm 1) in float64, one rate per step."""
    m = v = np.zeros_like(w)
    out = []
    for t, (g, lr) in enumerate(zip(grads, rates), start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        w = w - lr * (m / (1 - beta1 ** t)) / (np.sqrt(v / (1 - beta2 ** t)) + eps)
        out.append(w)
    return out


@pytest.mark.parametrize('jit', [False, True])
def test_adam_with_step_decay_equals_the_hand_computation(jit):
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(3, 2))
    grads = [rng.normal(size=(3, 2)) for _ in range(7)]
    # lr 0.1 for updates 1-2, 0.05 for 3-4, 0.025 for 5-6, 0.0125 for 7.
    rates = [0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125]
    expected = _numpy_adam(grads, w0, rates)
    constant = _numpy_adam(grads, w0, [0.1] * 7)
    schedule = optim.step_decay(0.1, 2, 0.5)

    @tf.function(jit_compile=jit, autograph=False)
    def update(g, weights, state):
        return optim.adam_update([g], weights, state, schedule)

    weights = [tf.constant(w0, tf.float32)]
    state = optim.adam_init(weights)
    for t, g in enumerate(grads):
        weights, state = update(tf.constant(g, tf.float32), weights, state)
        np.testing.assert_allclose(weights[0].numpy(), expected[t], rtol=1e-5, atol=1e-6)
        assert int(state[0]) == t + 1
    assert not np.allclose(expected[-1], constant[-1], atol=1e-3)   # the decay matters here
    assert update.experimental_get_tracing_count() == 1             # the rate needs no retrace


def test_step_decay_values_and_a_restored_count_continues_the_schedule():
    schedule = optim.step_decay(1e-3, 2000, 0.5)
    values = [float(schedule(tf.constant(s, tf.int64))) for s in (1, 2000, 2001, 4000, 4001, 8001)]
    np.testing.assert_allclose(values, [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 6.25e-5])
    # The rate depends on the state's step count only, so a state restored at step 2000 takes
    # the same next update as the uninterrupted one.
    w = [tf.constant([1.0, -2.0])]
    g = [tf.constant([0.3, 0.1])]
    state = (tf.constant(2000, tf.int64), [tf.constant([0.01, 0.02])], [tf.constant([1e-3, 4e-3])])
    a, _ = optim.adam_update(g, w, state, schedule)
    b, _ = optim.adam_update(g, w, state, 5e-4)
    np.testing.assert_allclose(a[0].numpy(), b[0].numpy(), rtol=1e-7)


@pytest.mark.parametrize('every, factor, match', [
    (0, 0.5, 'every must be a positive integer'),
    (2.0, 0.5, 'every must be a positive integer'),
    (10, 0.0, r'factor must be in \(0, 1\]'),
    (10, 1.5, r'factor must be in \(0, 1\]'),
])
def test_step_decay_rejects_bad_arguments(every, factor, match):
    with pytest.raises(ValueError, match=match):
        optim.step_decay(1e-3, every, factor)


def _numpy_rmsprop(grads, w, rates, decay=0.95, momentum=0.9, eps=1e-10):
    """RMSProp with momentum in float64: mean square, momentum of the scaled step, one rate per
    step."""
    ms = mom = np.zeros_like(w)
    out = []
    for g, lr in zip(grads, rates):
        ms = decay * ms + (1 - decay) * g * g
        mom = momentum * mom + lr * g / np.sqrt(ms + eps)
        w = w - mom
        out.append(w)
    return out


@pytest.mark.parametrize('jit', [False, True])
def test_rmsprop_equals_the_hand_computation_in_float64(jit):
    rng = np.random.default_rng(1)
    w0 = [rng.normal(size=(3, 2)), rng.normal(size=(4,))]
    grads = [[rng.normal(size=w.shape) for w in w0] for _ in range(6)]
    rates = [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    schedule = optim.step_decay(0.1, 2, 0.5)

    @tf.function(jit_compile=jit, autograph=False)
    def update(g, weights, state):
        return optim.rmsprop_update(g, weights, state, schedule)

    weights = [tf.constant(w, tf.float64) for w in w0]
    state = optim.rmsprop_init(weights)
    expected = [_numpy_rmsprop([g[i] for g in grads], w0[i], rates) for i in range(2)]
    for t, g in enumerate(grads):
        weights, state = update([tf.constant(x, tf.float64) for x in g], weights, state)
        for i in range(2):
            np.testing.assert_allclose(weights[i].numpy(), expected[i][t], rtol=1e-13, atol=1e-14)
        assert int(state[0]) == t + 1
    # Momentum and the running mean square both matter: plain sign-like steps differ.
    no_momentum = _numpy_rmsprop([g[0] for g in grads], w0[0], rates, momentum=0.0)
    assert not np.allclose(expected[0][-1], no_momentum[-1], atol=1e-3)
    assert update.experimental_get_tracing_count() == 1


def test_rmsprop_first_step_is_lr_over_root_one_minus_decay():
    # ms = 0.05 g^2 after one step, so the step is lr g / (sqrt(0.05) |g|) = lr * sign(g) * 4.47
    # (up to epsilon = 1e-10 under the root: a relative 4e-9 here).
    w, state = optim.rmsprop_update([tf.constant([2.0, -0.5], tf.float64)],
                                    [tf.constant([0.0, 0.0], tf.float64)],
                                    optim.rmsprop_init([tf.zeros([2], tf.float64)]), 1e-4)
    np.testing.assert_allclose(w[0].numpy(), [-1e-4 / np.sqrt(0.05), 1e-4 / np.sqrt(0.05)],
                               rtol=1e-7)


def _numpy_adamw(grads, w, rates, weight_decay, beta1=0.9, beta2=0.999, eps=1e-8):
    """AdamW (Loshchilov & Hutter 2019, Algorithm 2, the decay scaled by the rate) in float64,
    with epsilon added to the uncorrected root as ``optim.adam_update`` (Kingma & Ba's
    efficient form), so that float64 agrees to rounding."""
    m = v = np.zeros_like(w)
    out = []
    for t, (g, lr) in enumerate(zip(grads, rates), start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        step = np.sqrt(1 - beta2 ** t) / (1 - beta1 ** t) * m / (np.sqrt(v) + eps)
        w = w - lr * (step + weight_decay * w)
        out.append(w)
    return out


@pytest.mark.parametrize('jit', [False, True])
def test_decoupled_weight_decay_is_adamw_and_skips_the_weights_not_decayed(jit):
    rng = np.random.default_rng(2)
    w0 = [rng.normal(size=(3, 2)), rng.normal(size=(2,))]
    grads = [[rng.normal(size=w.shape) for w in w0] for _ in range(5)]
    rates = [0.1, 0.1, 0.05, 0.05, 0.025]
    update = optim.decoupled_weight_decay(optim.adam_update, 0.3, lambda i, w: i == 0)

    @tf.function(jit_compile=jit, autograph=False)
    def step(g, weights, state):
        return update(g, weights, state, optim.step_decay(0.1, 2, 0.5))

    weights = [tf.constant(w, tf.float64) for w in w0]
    state = optim.adam_init(weights)
    decayed = _numpy_adamw([g[0] for g in grads], w0[0], rates, 0.3)
    plain = _numpy_adamw([g[1] for g in grads], w0[1], rates, 0.0)
    for t, g in enumerate(grads):
        weights, state = step([tf.constant(x, tf.float64) for x in g], weights, state)
        np.testing.assert_allclose(weights[0].numpy(), decayed[t], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(weights[1].numpy(), plain[t], rtol=1e-12, atol=1e-14)
    # The decay matters here: Adam alone ends elsewhere.
    assert not np.allclose(decayed[-1], _numpy_adamw([g[0] for g in grads], w0[0], rates, 0.0),
                           atol=1e-3)


def test_decoupled_weight_decay_shrinks_by_one_minus_rate_times_decay_without_gradient():
    w = [tf.constant([2.0, -4.0], tf.float64)]
    state = optim.rmsprop_init(w)
    update = optim.decoupled_weight_decay(optim.rmsprop_update, 0.5, lambda i, w: True)
    new, _ = update([tf.zeros([2], tf.float64)], w, state, 0.1)
    np.testing.assert_allclose(new[0].numpy(), [2.0 * 0.95, -4.0 * 0.95], rtol=1e-12)
    for bad in (-0.1, True, '0.1', float('nan')):
        with pytest.raises(ValueError, match='weight_decay must be a number >= 0'):
            optim.decoupled_weight_decay(optim.adam_update, bad, lambda i, w: True)
