"""Tests for functional_meta.protonet: kernels against brute force, gradients against finite
differences, toy problems with known answers, training, tracing and input validation."""

import numpy as np
import pytest
import tensorflow as tf

from functional_meta import metrics, nets, optim, protonet


def flatten(weights, x):
    """An embedding with no weights: the image itself, as [T, n, D]."""
    del weights
    return tf.reshape(x, [x.shape[0], x.shape[1], -1])


def small_conv4(channels=4):
    return nets.conv4(None, channels=channels, in_shape=(8, 8, 1), pool="max", blocks=2)


def make_episodes(rng, batch, n_way, shot, n_query, shape=(8, 8, 1), noise=0.3, dtype=np.float32):
    """Meta-batch where class c of episode b is a fixed random pattern plus Gaussian noise; the
    support and query orders are shuffled so labels are not sorted."""
    patterns = rng.normal(size=(batch, n_way) + shape)
    episodes = []
    for count in (shot, n_query):
        labels = np.stack([rng.permutation(np.repeat(np.arange(n_way), count)) for _ in range(batch)])
        images = patterns[np.arange(batch)[:, None], labels]
        images = images + noise * rng.normal(size=images.shape)
        episodes += [images.astype(dtype), labels.astype(np.int32)]
    return tuple(episodes)


# ----- kernels ---------------------------------------------------------------------------------

def brute_squared_euclidean(q, p):
    q, p = np.asarray(q, np.float64), np.asarray(p, np.float64)
    out = np.zeros((q.shape[0], q.shape[1], p.shape[1]))
    for b in range(q.shape[0]):
        for i in range(q.shape[1]):
            for j in range(p.shape[1]):
                out[b, i, j] = np.sum((q[b, i] - p[b, j]) ** 2)
    return out


def brute_cosine(q, p):
    q, p = np.asarray(q, np.float64), np.asarray(p, np.float64)
    out = np.zeros((q.shape[0], q.shape[1], p.shape[1]))
    for b in range(q.shape[0]):
        for i in range(q.shape[1]):
            for j in range(p.shape[1]):
                norms = np.linalg.norm(q[b, i]) * np.linalg.norm(p[b, j])
                out[b, i, j] = 1.0 - (q[b, i] @ p[b, j] / norms if norms > 0 else 0.0)
    return out


def queries_with_duplicates(rng, scale, offset=0.0):
    protos = offset + scale * rng.normal(size=(3, 5, 16))
    queries = offset + scale * rng.normal(size=(3, 7, 16))
    queries[:, :5] = protos[:, [3, 0, 4, 1, 2]]        # every prototype is also a query
    return queries, protos


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_squared_euclidean_matches_brute_force(dtype, scale):
    q, p = queries_with_duplicates(np.random.default_rng(0), scale)
    q, p = q.astype(dtype), p.astype(dtype)
    got = protonet.distances(q, p, "euclidean").numpy()
    want = brute_squared_euclidean(q, p)
    assert got.dtype == dtype and got.shape == (3, 7, 5)
    assert np.all(np.isfinite(got)) and np.all(got >= 0.0)
    eps = np.finfo(dtype).eps
    # Duplicates: zero up to rounding relative to the squared norms, never negative.
    bound = 16 * eps * (np.sum(q.astype(np.float64) ** 2, -1)[:, :, None]
                        + np.sum(p.astype(np.float64) ** 2, -1)[:, None, :])
    assert np.all(np.abs(got - want) <= bound + 1e-300)
    distinct = want > 0
    rel = np.abs(got - want)[distinct] / want[distinct]
    assert rel.max() < 100 * eps


def test_squared_euclidean_large_common_offset():
    # Points 1e3 from the origin but ~1 apart: the naive expansion would lose several digits in
    # float32; centring on the prototype mean keeps the relative error small.
    q, p = queries_with_duplicates(np.random.default_rng(1), 1.0, offset=1e3)
    got = protonet.distances(q.astype(np.float32), p.astype(np.float32)).numpy()
    want = brute_squared_euclidean(q.astype(np.float32), p.astype(np.float32))
    assert np.all(got >= 0.0)
    distinct = want > 0
    assert (np.abs(got - want)[distinct] / want[distinct]).max() < 1e-3
    assert np.abs(got - want)[~distinct].max() < 1e-3


@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_cosine_matches_brute_force(scale):
    q, p = queries_with_duplicates(np.random.default_rng(2), scale)
    q[0, 6] = 0.0                                      # a zero query
    p[1, 2] = 0.0                                      # a zero prototype
    got = protonet.distances(q.astype(np.float32), p.astype(np.float32), "cosine").numpy()
    want = brute_cosine(q.astype(np.float32), p.astype(np.float32))
    assert np.all(np.isfinite(got)) and np.all(got >= 0.0) and np.all(got <= 2.0)
    np.testing.assert_allclose(got, want, atol=1e-6)
    got64 = protonet.distances(q, p, "cosine").numpy()
    np.testing.assert_allclose(got64, brute_cosine(q, p), atol=1e-14)


@pytest.mark.parametrize("metric", protonet.METRICS)
@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_gradient_finite_where_query_equals_prototype(metric, dtype):
    q, p = queries_with_duplicates(np.random.default_rng(3), 1.0)
    q[0, 6] = 0.0
    p[2, 4] = 0.0
    q[2, 6] = 0.0                                      # zero query against a zero prototype
    q, p = tf.constant(q, dtype), tf.constant(p, dtype)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([q, p])
        d = protonet.distances(q, p, metric)
        diagonal = tf.reduce_sum(d[:, :5])             # includes the exact duplicates
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.zeros([3, 7], tf.int32), logits=-d))
    assert not np.any(np.isnan(d.numpy()))
    for target in (diagonal, loss):
        for g in tape.gradient(target, [q, p]):
            assert np.all(np.isfinite(g.numpy()))


def test_distance_gradient_matches_analytic_away_from_duplicates():
    rng = np.random.default_rng(4)
    q, p = tf.constant(rng.normal(size=(2, 3, 4))), tf.constant(rng.normal(size=(2, 5, 4)))
    with tf.GradientTape() as tape:
        tape.watch([q, p])
        total = tf.reduce_sum(protonet.distances(q, p))
    gq, gp = tape.gradient(total, [q, p])
    qn, pn = q.numpy(), p.numpy()
    # d/dq sum_j |q - p_j|^2 = 2 sum_j (q - p_j); d/dp_j = -2 sum_i (q_i - p_j).
    np.testing.assert_allclose(gq, 2 * (5 * qn - pn.sum(1, keepdims=True)), rtol=1e-12)
    np.testing.assert_allclose(gp, -2 * (qn.sum(1, keepdims=True) - 3 * pn), rtol=1e-12)


def test_distances_rejects_bad_metric_and_shapes():
    with pytest.raises(ValueError, match="metric"):
        protonet.distances(np.zeros((1, 2, 3)), np.zeros((1, 2, 3)), "manhattan")
    with pytest.raises(ValueError, match="features"):
        protonet.distances(np.zeros((1, 2, 3)), np.zeros((1, 2, 4)))


def test_prototypes_are_class_means():
    rng = np.random.default_rng(5)
    n_way, shot, dim = 4, 3, 6
    labels = np.stack([rng.permutation(np.repeat(np.arange(n_way), shot)) for _ in range(2)])
    labels[1, labels[1] == 2] = 0                      # episode 1: class 0 has 6 examples, 2 none
    labels[1, :2] = 2                                  # ... then 2 of them move back to class 2
    embeddings = rng.normal(size=(2, n_way * shot, dim))
    got = protonet.prototypes(embeddings, labels.astype(np.int32), n_way).numpy()
    assert got.shape == (2, n_way, dim)
    for b in range(2):
        for c in range(n_way):
            np.testing.assert_allclose(got[b, c], embeddings[b][labels[b] == c].mean(0), rtol=1e-12)


def test_prototypes_of_an_empty_class_are_zero():
    got = protonet.prototypes(np.ones((1, 2, 3), np.float32), np.array([[0, 0]], np.int32), 2)
    np.testing.assert_array_equal(got.numpy(), [[[1, 1, 1], [0, 0, 0]]])


# ----- loss and gradients ----------------------------------------------------------------------

@pytest.mark.parametrize("metric", protonet.METRICS)
def test_loss_gradient_matches_finite_differences(metric):
    init, apply = small_conv4()
    weights = init(7, dtype=tf.float64)
    episodes = make_episodes(np.random.default_rng(6), 2, 3, 2, 2, noise=1.0, dtype=np.float64)
    episodes = tuple(tf.constant(e) for e in episodes)

    def loss_of(ws):
        return protonet.loss_and_logits(apply, ws, episodes, 3, metric)[0]

    with tf.GradientTape() as tape:
        tape.watch(weights)
        loss = loss_of(weights)
    grads = tape.gradient(loss, weights)
    assert loss.dtype == tf.float64 and all(g is not None for g in grads)
    rng = np.random.default_rng(8)
    step = 1e-5
    for _ in range(3):
        direction = [rng.normal(size=w.shape) for w in weights]
        norm = np.sqrt(sum(np.sum(d ** 2) for d in direction))
        direction = [d / norm for d in direction]
        analytic = sum(np.sum(g.numpy() * d) for g, d in zip(grads, direction))
        plus = loss_of([w + step * d for w, d in zip(weights, direction)]).numpy()
        minus = loss_of([w - step * d for w, d in zip(weights, direction)]).numpy()
        numeric = (plus - minus) / (2 * step)
        assert abs(analytic) > 1e-4                    # the check is not vacuous
        assert abs(numeric - analytic) / abs(analytic) < 1e-6


def test_loss_is_mean_cross_entropy_of_negative_distances():
    rng = np.random.default_rng(9)
    episodes = make_episodes(rng, 2, 3, 2, 4, shape=(5,), dtype=np.float64)
    support_x, support_y, query_x, query_y = episodes
    loss, out = protonet.loss_and_logits(flatten, [], episodes, 3, "euclidean")
    total, count = 0.0, 0
    for b in range(2):
        means = np.stack([support_x[b][support_y[b] == c].mean(0) for c in range(3)])
        want = -brute_squared_euclidean(query_x[b][None], means[None])[0]
        np.testing.assert_allclose(out[b].numpy(), want, rtol=1e-10, atol=1e-10)
        shifted = want - want.max(1, keepdims=True)
        log_softmax = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
        total -= log_softmax[np.arange(len(query_y[b])), query_y[b]].sum()
        count += len(query_y[b])
    np.testing.assert_allclose(loss.numpy(), total / count, rtol=1e-10)


# ----- toy problems ----------------------------------------------------------------------------

@pytest.mark.parametrize("metric", protonet.METRICS)
def test_separated_classes_are_classified_perfectly(metric):
    episodes = make_episodes(np.random.default_rng(10), 4, 5, 1, 15, noise=0.05)
    eval_step = protonet.make_eval_step(flatten, 5, metric, jit_compile=False)
    accuracy, predictions = eval_step([], episodes)
    np.testing.assert_array_equal(accuracy.numpy(), np.ones(4))
    np.testing.assert_array_equal(predictions.numpy(), episodes[3])


def test_separated_classes_with_random_conv4_embedding():
    # Images constant per class: even a randomly initialised conv4 separates them.
    rng = np.random.default_rng(11)
    n_way, batch = 5, 3
    values = np.stack([rng.permutation(np.linspace(-2.0, 2.0, n_way)) for _ in range(batch)])
    support_y = np.tile(np.arange(n_way), (batch, 2)).astype(np.int32)
    query_y = np.stack([rng.permutation(np.repeat(np.arange(n_way), 4)) for _ in range(batch)])
    query_y = query_y.astype(np.int32)

    def images(labels):
        v = values[np.arange(batch)[:, None], labels]
        return np.broadcast_to(v[:, :, None, None, None], labels.shape + (8, 8, 1)).astype(np.float32)

    init, apply = small_conv4(channels=8)
    eval_step = protonet.make_eval_step(apply, n_way, jit_compile=False)
    accuracy, _ = eval_step(init(0), (images(support_y), support_y, images(query_y), query_y))
    np.testing.assert_array_equal(accuracy.numpy(), np.ones(batch))


def test_shuffled_query_labels_give_chance_accuracy():
    rng = np.random.default_rng(12)
    support_x, support_y, query_x, query_y = make_episodes(rng, 8, 5, 1, 20, noise=0.05)
    shuffled = np.stack([rng.permutation(y) for y in query_y])
    eval_step = protonet.make_eval_step(flatten, 5, jit_compile=False)
    accuracy, predictions = eval_step([], (support_x, support_y, query_x, shuffled))
    np.testing.assert_array_equal(predictions.numpy(), query_y)   # still predicts the images
    assert accuracy.numpy().mean() < 0.5                            # 800 queries, chance is 0.2


def test_evaluate_mean_and_interval():
    rng = np.random.default_rng(13)
    calls = []

    def sample_fn():
        calls.append(1)
        return make_episodes(rng, 4, 5, 1, 5, noise=0.05)

    mean, ci95 = protonet.evaluate(flatten, [], sample_fn, 10, 5, jit_compile=False)
    assert (mean, ci95) == (1.0, 0.0) and len(calls) == 3

    def shuffled_fn():
        s_x, s_y, q_x, q_y = make_episodes(rng, 4, 5, 1, 5, noise=0.05)
        return s_x, s_y, q_x, np.stack([rng.permutation(y) for y in q_y])

    per_episode = []
    step = protonet.make_eval_step(flatten, 5, jit_compile=False)
    state = rng.bit_generator.state
    for _ in range(5):
        per_episode += step([], shuffled_fn())[0].numpy().tolist()
    rng.bit_generator.state = state
    mean, ci95 = protonet.evaluate(flatten, [], shuffled_fn, 20, 5, jit_compile=False)
    assert (mean, ci95) == pytest.approx(metrics.mean_confidence_interval(per_episode))
    assert mean < 0.5 and ci95 > 0.0


def test_paper_embedding_on_omniglot_sized_images():
    init, apply = nets.conv4(None, channels=64, in_shape=(28, 28, 1), pool="max")
    assert init.embedding_size == 64
    episodes = make_episodes(np.random.default_rng(18), 1, 5, 1, 2, shape=(28, 28, 1))
    out = protonet.logits(apply, init(0), *[tf.constant(e) for e in episodes[:3]], 5)
    assert out.shape == (1, 10, 5) and np.all(out.numpy() <= 0.0)


# ----- training --------------------------------------------------------------------------------

def test_train_steps_reduce_loss_without_retracing():
    rng = np.random.default_rng(14)
    init, apply = small_conv4(channels=8)
    weights = init(0)
    state = protonet.init_state(weights)
    step = protonet.make_train_step(apply, 5, lr=3e-3, jit_compile=False)
    losses = []
    for _ in range(30):
        episodes = make_episodes(rng, 4, 5, 1, 5, noise=1.5)
        state, out = step(state, episodes)
        assert 0.0 <= float(out["accuracy"]) <= 1.0
        losses.append(float(out["loss"]))
    weights, opt_state = state["weights"], state["opt"]
    assert step.tracing_count() == 1
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8])
    assert int(opt_state[0]) == 30 and len(weights) == len(init(0))
    # The trained embedding works at another way (no head): 3-way evaluation.
    eval_step = protonet.make_eval_step(apply, 3, jit_compile=False)
    accuracy, predictions = eval_step(weights, make_episodes(rng, 2, 3, 2, 4, noise=1.5))
    assert accuracy.shape == (2,) and predictions.shape == (2, 12)
    eval_step(weights, make_episodes(rng, 2, 3, 2, 4, noise=1.5))
    assert eval_step.tracing_count() == 1


def test_train_step_is_pure_and_matches_manual_update():
    init, apply = small_conv4()
    weights = init(3)
    opt_state = optim.adam_init(weights)
    episodes = make_episodes(np.random.default_rng(15), 2, 3, 2, 3)
    step = protonet.make_train_step(apply, 3, lr=1e-2, jit_compile=False)
    state = {"weights": weights, "opt": opt_state}
    first = step(state, episodes)
    again = step(state, episodes)          # same inputs, same outputs
    for a, b in zip(first[0]["weights"], again[0]["weights"]):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    tensors = tuple(tf.constant(e) for e in episodes)
    with tf.GradientTape() as tape:
        tape.watch(weights)
        loss, out = protonet.loss_and_logits(apply, weights, tensors, 3)
    manual, _ = optim.adam_update(tape.gradient(loss, weights), weights, opt_state, 1e-2)
    np.testing.assert_allclose(first[1]["loss"].numpy(), loss.numpy(), rtol=1e-6)
    np.testing.assert_allclose(first[1]["accuracy"].numpy(),
                               metrics.accuracy(out.numpy(), episodes[3]), rtol=1e-6)
    for a, b in zip(first[0]["weights"], manual):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_jit_compile_matches_plain_function():
    init, apply = small_conv4()
    weights = init(1)
    opt_state = optim.adam_init(weights)
    rng = np.random.default_rng(16)
    batches = [make_episodes(rng, 2, 5, 1, 3) for _ in range(2)]
    results = {}
    for jit in (True, False):
        step = protonet.make_train_step(apply, 5, jit_compile=jit)
        state = {"weights": weights, "opt": opt_state}
        losses = []
        for episodes in batches:
            state, out = step(state, episodes)
            losses.append(float(out["loss"]))
        assert step.tracing_count() == 1
        results[jit] = losses, state["weights"]
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-4)
    for a, b in zip(results[True][1], results[False][1]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)


# ----- bad input -------------------------------------------------------------------------------

def test_validate_episode_accepts_good_labels():
    protonet.validate_episode(np.array([[2, 0, 1]]), np.array([[0, 1, 2, 2]]), 3)
    protonet.validate_episode([1, 0], [0], 2)             # one episode, no batch axis


def test_validate_episode_names_missing_class():
    support = np.array([[0, 1, 2, 3], [0, 1, 1, 2]], np.int32)
    with pytest.raises(ValueError, match=r"episode 1: .*no example of class 3"):
        protonet.validate_episode(support, np.zeros((2, 4), np.int32), 4)


@pytest.mark.parametrize("which", ["support", "query"])
@pytest.mark.parametrize("label", [5, -1])
def test_validate_episode_names_out_of_range_label(which, label):
    support = np.tile(np.arange(5), (2, 1)).astype(np.int32)
    query = np.zeros((2, 3), np.int32)
    target = support if which == "support" else query
    target[1, 2] = label
    with pytest.raises(ValueError, match=rf"{which}_y: label {label} at episode 1, position 2 "
                                         r"is outside 0\.\.4"):
        protonet.validate_episode(support, query, 5)


def test_validate_episode_rejects_float_labels():
    with pytest.raises(ValueError, match="integer"):
        protonet.validate_episode(np.array([0.0, 1.0]), np.array([0, 1]), 2)


def test_steps_reject_bad_labels_before_tracing():
    init, apply = small_conv4()
    weights = init(0)
    support_x, support_y, query_x, query_y = make_episodes(np.random.default_rng(17), 2, 3, 1, 2)
    missing = support_y.copy()
    missing[0] = [0, 0, 1]
    step = protonet.make_train_step(apply, 3, jit_compile=False)
    with pytest.raises(ValueError, match="episode 0: .*no example of class 2"):
        step(protonet.init_state(weights), (support_x, missing, query_x, query_y))
    assert step.tracing_count() == 0
    eval_step = protonet.make_eval_step(apply, 3, jit_compile=False)
    bad_query = query_y.copy()
    bad_query[1, 1] = 3
    with pytest.raises(ValueError, match="label 3 at episode 1, position 1"):
        eval_step(weights, (support_x, support_y, query_x, bad_query))
    assert eval_step.tracing_count() == 0
    with pytest.raises(ValueError, match="no example of class 2"):
        protonet.evaluate(apply, weights, lambda: (support_x, missing, query_x, query_y), 4, 3,
                          jit_compile=False)


def test_bad_arguments():
    _, apply = small_conv4()
    with pytest.raises(ValueError, match="metric"):
        protonet.make_train_step(apply, 5, metric="l1")
    with pytest.raises(ValueError, match="n_way"):
        protonet.make_eval_step(apply, 0)
    with pytest.raises(ValueError, match="num_episodes"):
        protonet.evaluate(apply, [], lambda: None, 0, 5)
