"""MLDG and ERM: gradients against finite differences and a closed form in float64, the compiled
step against the eager gradient, and both learning a fixed label set across domains."""

import numpy as np
import pytest
import tensorflow as tf

from functional_meta import data, domains, mldg, nets, optim


def linear(weights, x):
    """``x [T, n, d] @ w [d, 1]`` (or per-task ``w [T, d, 1]``): the closed form's linear model."""
    return tf.matmul(x, weights[0])


def test_mldg_gradient_of_a_linear_model_with_squared_loss_is_the_closed_form():
    """Meta-train rows ``A`` (m of them, targets ``a``), meta-test rows ``B`` (k, targets ``b``):

    L_tr(w) = |A w - a|^2 / m, so grad L_tr(w) = H w - h with H = 2 A^T A / m, h = 2 A^T a / m;
    the virtual step w' = w - alpha (H w - h) = (I - alpha H) w + alpha h is linear in w, and
    L_te(u) = |B u - b|^2 / k has grad 2 B^T (B u - b) / k. By the chain rule (H symmetric)

        grad L(w) = (H w - h) + beta (I - alpha H) 2 B^T (B w' - b) / k.

    The first-order variant drops the factor (I - alpha H).
    """
    rng = np.random.default_rng(0)
    d, n, domain_count, alpha, beta = 3, 4, 3, 0.3, 0.7
    x = rng.normal(size=(domain_count, n, d))
    y = rng.normal(size=(domain_count, n, 1))
    w = rng.normal(size=(d, 1))
    batch = (tf.constant(x), tf.constant(y))
    value, (grad,) = mldg.gradients(linear, [tf.constant(w)], batch, inner_lr=alpha, beta=beta,
                                    meta_test=1, loss="mse")
    a_rows, a = x[:2].reshape(-1, d), y[:2].reshape(-1, 1)     # the first two are meta-train
    b_rows, b = x[2], y[2]
    m, k = len(a_rows), len(b_rows)
    h_mat, h = 2 * a_rows.T @ a_rows / m, 2 * a_rows.T @ a / m
    w_virtual = w - alpha * (h_mat @ w - h)
    test_grad = 2 * b_rows.T @ (b_rows @ w_virtual - b) / k
    expected = (h_mat @ w - h) + beta * (np.eye(d) - alpha * h_mat) @ test_grad
    expected_value = (np.sum((a_rows @ w - a) ** 2) / m
                      + beta * np.sum((b_rows @ w_virtual - b) ** 2) / k)
    np.testing.assert_allclose(value.numpy(), expected_value, rtol=1e-12)
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-10)
    _, (first,) = mldg.gradients(linear, [tf.constant(w)], batch, inner_lr=alpha, beta=beta,
                                 loss="mse", first_order=True)
    np.testing.assert_allclose(first.numpy(), (h_mat @ w - h) + beta * test_grad, rtol=1e-10)
    assert np.abs(first.numpy() - expected).max() > 1e-3       # the second order matters here
    # ERM: the pooled mean squared error, gradient 2 X^T (X w - y) / N.
    _, (erm,) = mldg.gradients(linear, [tf.constant(w)], batch, algorithm="erm", loss="mse")
    rows, targets = x.reshape(-1, d), y.reshape(-1, 1)
    np.testing.assert_allclose(erm.numpy(), 2 * rows.T @ (rows @ w - targets) / len(rows),
                               rtol=1e-10)


def small_problem(dtype=tf.float64, domain_count=4, n=5, classes=3, seed=0):
    init, apply = nets.mlp([6, 5, classes], activation=tf.tanh, in_shape=(6,))
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=(domain_count, n, 6)), dtype)
    y = tf.constant(rng.integers(0, classes, size=(domain_count, n)), tf.int32)
    return init(seed, dtype), apply, (x, y)


@pytest.mark.parametrize("meta_test", [1, 2])
def test_mldg_gradient_matches_central_differences_in_float64(meta_test):
    weights, apply, batch = small_problem()
    options = dict(inner_lr=0.5, beta=1.3, meta_test=meta_test)
    value, grads = mldg.gradients(apply, weights, batch, **options)
    _, first = mldg.gradients(apply, weights, batch, first_order=True, **options)
    rng = np.random.default_rng(1)
    eps = 1e-5
    for _ in range(3):
        direction = [tf.constant(rng.normal(size=w.shape)) for w in weights]

        def at(sign):
            moved = [w + sign * eps * v for w, v in zip(weights, direction)]
            return mldg.objective(apply, "mldg", **options)(moved, batch)[0].numpy()
        numeric = (at(1) - at(-1)) / (2 * eps)
        exact = sum(float(tf.reduce_sum(g * v)) for g, v in zip(grads, direction))
        approx = sum(float(tf.reduce_sum(g * v)) for g, v in zip(first, direction))
        assert abs(exact - numeric) < 1e-8 * max(1.0, abs(numeric)), (exact, numeric)
        assert abs(approx - numeric) > 1e-5, "the first-order gradient should miss the numeric one"


def test_compiled_step_applies_adam_to_the_exact_gradient():
    weights, apply, batch = small_problem()
    for algorithm, options in (("mldg", dict(inner_lr=0.5, beta=1.0)), ("erm", {})):
        _, grads = mldg.gradients(apply, weights, batch, algorithm, **options)
        expected, _ = optim.adam_update(grads, weights, optim.adam_init(weights), 0.01)
        step = mldg.make_train_step(apply, algorithm, lr=0.01, jit_compile=True, **options)
        state, result = step(mldg.init_state(weights), batch)
        for got, want in zip(state["weights"], expected):
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9, atol=1e-12)
        assert set(result) == {"loss", "accuracy"} and 0 <= float(result["accuracy"]) <= 1


def test_bad_options_are_named():
    weights, apply, batch = small_problem(domain_count=2)
    with pytest.raises(ValueError, match="meta_test=2"):
        mldg.gradients(apply, weights, batch, inner_lr=0.1, meta_test=2)
    with pytest.raises(ValueError, match="algorithm"):
        mldg.objective(apply, "dann")
    with pytest.raises(ValueError, match="inner_lr"):
        mldg.objective(apply, "erm", inner_lr=0.1)


def test_mldg_and_erm_learn_a_fixed_label_set_across_domains_and_score_a_new_one():
    base = data.synthetic(4, 80, (8, 8, 1), seed=0)
    names = ["clean", "rotate:10", "rotate:20", "rotate:5"]
    parts = domains.partition(base, len(names), seed=0)
    train = [domains.apply(p, name) for p, name in zip(parts[:3], names[:3])]
    held_out = domains.apply(parts[3], names[3])
    sampler = domains.DomainBatchSampler(train, batch_size=16, seed=0)
    init, apply = nets.mlp([64, 32, 4], in_shape=(8, 8, 1))
    hits = mldg.make_eval_step(apply)
    x, y = domains.labelled(held_out)
    for algorithm, options in (("mldg", dict(inner_lr=0.1, beta=1.0)), ("erm", {})):
        step = mldg.make_train_step(apply, algorithm, lr=3e-3, **options)
        state = mldg.init_state(init(0))
        before = mldg.evaluate(hits, state["weights"], x, y, batch_size=64)
        for i in range(60):
            state, result = step(state, sampler.batch(i))
        after = mldg.evaluate(hits, state["weights"], x, y, batch_size=64)
        assert after["accuracy"] > max(0.9, before["accuracy"] + 0.2), (algorithm, before, after)
        assert after["accuracy_ci95"] < 0.1 and 0 < before["accuracy_ci95"]
