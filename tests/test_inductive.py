"""Strictly inductive scoring (``bn='support'``): batch norm takes its statistics from the support
set alone, so a query's output does not depend on the other queries; under the default
(``'transductive'``) it does. Checked for conv4's ``bn_rows``, ProtoNet's logits and MAML's query
outputs after adaptation, with a float64 derivative check of the new batch-norm path."""

import numpy as np
import pytest
import tensorflow as tf

from functional_meta import maml, nets, protonet

SHAPE = (12, 12, 1)


def tiny(n_way=None, dtype=tf.float32):
    init, apply = nets.conv4(n_way, channels=4, in_shape=SHAPE, pool="max", blocks=2)
    return init(0, dtype), apply


def episode(seed, tasks=2, n_way=3, k_shot=2, queries=4, dtype=np.float32, shape=SHAPE):
    rng = np.random.default_rng(seed)
    support_x = rng.uniform(0, 1, (tasks, n_way * k_shot) + shape).astype(dtype)
    support_y = np.tile(np.repeat(np.arange(n_way, dtype=np.int32), k_shot), (tasks, 1))
    query_x = rng.uniform(0, 1, (tasks, queries) + shape).astype(dtype)
    query_y = rng.integers(0, n_way, (tasks, queries)).astype(np.int32)
    return support_x, support_y, query_x, query_y


def others_changed(query_x, seed=9):
    """The same query sets with every query but the first replaced."""
    changed = query_x.copy()
    changed[:, 1:] = np.random.default_rng(seed).uniform(0, 1, changed[:, 1:].shape)
    return changed


def test_conv4_bn_rows_normalises_everything_with_the_first_rows_statistics():
    weights, apply = tiny()
    support_x, _, query_x, _ = episode(0)
    k = support_x.shape[1]
    both = np.concatenate([support_x, query_x], 1)
    out = apply(weights, both, bn_rows=k).numpy()
    # The support rows' statistics are the support set's own: the same as applying it alone.
    np.testing.assert_allclose(out[:, :k], apply(weights, support_x).numpy(), atol=1e-5)
    changed = apply(weights, np.concatenate([support_x, others_changed(query_x)], 1),
                    bn_rows=k).numpy()
    np.testing.assert_array_equal(out[:, k], changed[:, k])
    pooled = apply(weights, both).numpy()
    assert np.abs(pooled[:, k] - out[:, k]).max() > 1e-3      # the default pools every row
    with pytest.raises(ValueError, match="bn_rows"):
        apply(weights, both, bn_rows=both.shape[1] + 1)


def test_protonet_query_logits_ignore_the_other_queries_only_under_support():
    weights, apply = tiny()
    support_x, support_y, query_x, _ = episode(1)
    changed = others_changed(query_x)
    for bn, independent in (("support", True), ("transductive", False)):
        a = protonet.logits(apply, weights, support_x, support_y, query_x, 3, bn=bn).numpy()
        b = protonet.logits(apply, weights, support_x, support_y, changed, 3, bn=bn).numpy()
        if independent:
            np.testing.assert_array_equal(a[:, 0], b[:, 0])
        else:
            assert np.abs(a[:, 0] - b[:, 0]).max() > 1e-3
    with pytest.raises(ValueError, match="bn must be one of"):
        protonet.make_eval_step(apply, 3, bn="query")


def test_maml_query_outputs_after_adaptation_ignore_the_other_queries_only_under_support():
    weights, apply = tiny(n_way=3)
    support_x, support_y, query_x, _ = episode(2)
    adapted = maml.adapt(apply, weights, tf.constant(support_x), tf.constant(support_y), 0.4, 2,
                         first_order=True)
    changed = others_changed(query_x)
    for bn, independent in (("support", True), ("transductive", False)):
        a = maml.query_outputs(apply, adapted, support_x, query_x, bn).numpy()
        b = maml.query_outputs(apply, adapted, support_x, changed, bn).numpy()
        if independent:
            np.testing.assert_array_equal(a[:, 0], b[:, 0])
        else:
            assert np.abs(a[:, 0] - b[:, 0]).max() > 1e-3


@pytest.mark.slow
def test_maml_eval_step_scores_support_normalised_queries_compiled_as_eagerly():
    weights, apply = tiny(n_way=3)
    tasks = tuple(tf.constant(a) for a in episode(3))
    adapted = maml.adapt(apply, weights, tasks[0], tasks[1], 0.4, 1, first_order=True)
    expected = maml.cross_entropy(maml.query_outputs(apply, adapted, tasks[0], tasks[2],
                                                     "support"), tasks[3]).numpy()
    for jit in (False, True):
        step = maml.make_eval_step(apply, inner_steps=1, jit_compile=jit, bn="support")
        losses, _ = step(weights, tf.constant(0.4), tasks)
        np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-4)
    transductive = maml.make_eval_step(apply, inner_steps=1, jit_compile=False)
    assert np.abs(transductive(weights, tf.constant(0.4), tasks)[0].numpy() - expected).max() > 1e-4


def test_support_statistics_derivative_matches_central_differences_in_float64():
    """ProtoNet can train with ``bn='support'``: its loss's derivative along a random direction of
    every weight equals the central difference, to 1e-7 relative."""
    weights, apply = tiny(dtype=tf.float64)
    episodes = episode(4, dtype=np.float64)
    rng = np.random.default_rng(5)
    direction = [rng.normal(size=w.shape) for w in weights]
    # A unit direction and a small step: no ReLU or max-pool kink is crossed between the points.
    norm = np.sqrt(sum((d ** 2).sum() for d in direction))
    direction = [tf.constant(d / norm) for d in direction]

    def loss(ws):
        return protonet.loss_and_logits(apply, ws, episodes, 3, bn="support")[0]

    with tf.GradientTape() as tape:
        tape.watch(weights)
        value = loss(weights)
    grads = tape.gradient(value, weights)
    analytic = sum(float(tf.reduce_sum(g * d)) for g, d in zip(grads, direction))
    eps = 1e-6
    plus = loss([w + eps * d for w, d in zip(weights, direction)])
    minus = loss([w - eps * d for w, d in zip(weights, direction)])
    numeric = float(plus - minus) / (2 * eps)
    assert abs(analytic - numeric) <= 1e-7 * max(1.0, abs(numeric)), (analytic, numeric)


def test_protonet_learner_trains_with_the_configured_statistics():
    """``bn='support'`` in the config reaches the compiled ProtoNet step and the default
    evaluator: one step's loss equals the support-statistics loss of the initial weights and
    differs from the transductive one; other learners refuse it before anything compiles."""
    from functional_meta import configs, training
    losses = {}
    for bn in ("transductive", "support"):
        config = configs.make_config("protonet", data="synthetic", channels=4,
                                     image_shape=[16, 16, 1], n_way=3, k_shot=2, q_query=2,
                                     meta_batch=2, bn=bn)
        assert config["bn"] == bn
        learner = training.make_learner(config, jit_compile=False)
        state = learner.init(0)
        batch = episode(1, queries=6, shape=(16, 16, 1))
        _, metrics = learner.step(state, batch)
        expected, _ = protonet.loss_and_logits(learner.apply, state["weights"], batch, 3, bn=bn)
        np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-5)
        losses[bn] = float(metrics["loss"])
        evaluator = training.make_evaluator(config, learner.apply, n_way=3, jit_compile=False)
        assert evaluator(state, batch)["accuracy"].shape == (2,)
    assert abs(losses["support"] - losses["transductive"]) > 1e-4
    with pytest.raises(ValueError, match="bn='support' trains ProtoNet only"):
        configs.make_config("maml", data="synthetic", bn="support")
    with pytest.raises(ValueError, match="bn must be one of"):
        configs.make_config("protonet", data="synthetic", bn="queries")
