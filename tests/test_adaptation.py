"""Test-time adaptation of ProtoNet embeddings (functional_meta.adaptation): the views, the
Proto-MAML head against ProtoNet's logits, zero steps and the identity view against plain
ProtoNet, the views of the queries, ensembles, transductive soft k-means against numpy, the
fine-tuning loss's gradient against finite differences (float64), inductive scoring, and
fine-tuning that helps an under-trained model."""

import numpy as np
import pytest
import tensorflow as tf

from _binaries import json_lines, run_binary
from functional_meta import adaptation, data, episodes, nets, protonet

SHAPE = (10, 10, 1)


def tiny(dtype=tf.float64, channels=4, seed=0):
    init, apply = nets.conv4(None, channels=channels, in_shape=SHAPE, pool="max", blocks=2)
    return init(seed, dtype), apply


def episode(seed, tasks=2, n_way=3, k_shot=2, queries=4, dtype=np.float64):
    rng = np.random.default_rng(seed)
    support_x = rng.uniform(0, 1, (tasks, n_way * k_shot) + SHAPE).astype(dtype)
    support_y = np.tile(np.repeat(np.arange(n_way, dtype=np.int32), k_shot), (tasks, 1))
    query_x = rng.uniform(0, 1, (tasks, queries) + SHAPE).astype(dtype)
    query_y = rng.integers(0, n_way, (tasks, queries)).astype(np.int32)
    return tuple(tf.constant(a) for a in (support_x, support_y, query_x, query_y))


def test_views_are_the_shifts_and_warps_they_name():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (2, 1, 7, 6, 1))
    m = adaptation.view_matrices(len(adaptation.VIEWS), 7, 6)
    out = adaptation.augment(tf.constant(images), m).numpy()        # [2, V, 7, 6, 1]
    np.testing.assert_array_equal(out[:, 0], images[:, 0])
    down = np.zeros_like(images[:, 0])
    down[:, 1:] = images[:, 0, :-1]                                  # row y <- row y - 1
    np.testing.assert_allclose(out[:, 1], down, atol=1e-15)
    left = np.zeros_like(images[:, 0])
    left[:, :, :-1] = images[:, 0, :, 1:]
    np.testing.assert_allclose(out[:, 4], left, atol=1e-15)
    for i, (angle, scale) in ((5, (10.0, 1.0)), (8, (0.0, 1.1))):
        expected = episodes.warp(images[:, 0], np.full(2, angle), np.full(2, scale))
        np.testing.assert_allclose(out[:, i], expected, atol=1e-12)
    with pytest.raises(ValueError, match=r"--tta.*1\.\.9"):
        adaptation.view_matrices(0, 7, 6)


@pytest.mark.parametrize("bn", ["transductive", "support"])
def test_zero_steps_one_view_is_plain_protonet_exactly(bn):
    weights, apply = tiny(tf.float32)
    batch = tuple(tf.cast(a, tf.float32) if a.dtype == tf.float64 else a for a in episode(1))
    plain = protonet.logits(apply, weights, batch[0], batch[1], batch[2], 3, bn=bn).numpy()
    same = adaptation.logits(apply, weights, batch, 3, steps=0, views=1, bn=bn).numpy()
    np.testing.assert_array_equal(plain, same)
    accuracy, predictions = protonet.make_eval_step(apply, 3, jit_compile=False, bn=bn)(
        weights, batch)
    got = adaptation.make_eval_step(apply, 3, jit_compile=False, bn=bn)(weights, batch)
    np.testing.assert_array_equal(accuracy.numpy(), got[0].numpy())
    np.testing.assert_array_equal(predictions.numpy(), got[1].numpy())


def test_identity_views_only_give_plain_protonet(monkeypatch):
    # Two identity views: the support set twice, the same prototypes and the same batch-norm
    # statistics of the support rows as the support set once.
    monkeypatch.setattr(adaptation, "VIEWS", ("identity", "identity"))
    weights, apply = tiny()
    batch = episode(2)
    plain = protonet.logits(apply, weights, batch[0], batch[1], batch[2], 3, bn="support")
    doubled = adaptation.logits(apply, weights, batch, 3, views=2, bn="support")
    np.testing.assert_allclose(doubled.numpy(), plain.numpy(), rtol=1e-10, atol=1e-10)
    monkeypatch.setattr(adaptation, "VIEWS", ("identity", "shift_down"))
    shifted = adaptation.logits(apply, weights, batch, 3, views=2, bn="support")
    assert np.abs(shifted.numpy() - plain.numpy()).max() > 1e-3


@pytest.mark.parametrize("bn", ["transductive", "support"])
@pytest.mark.parametrize("views", [1, 3])
def test_head_at_step_zero_is_protonet_euclidean_logits_plus_query_norm(bn, views):
    weights, apply = tiny()
    batch = episode(3)
    head = adaptation.adapted_logits(apply, weights, batch, 3, steps=0, lr=0.1, views=views,
                                     bn=bn).numpy()
    plain = adaptation.logits(apply, weights, batch, 3, steps=0, views=views, bn=bn).numpy()
    support_x, _ = adaptation._views(batch[0], batch[1], views)
    _, queries = adaptation._embed(apply, weights, support_x, batch[2], bn)
    norms = tf.reduce_sum(tf.square(queries), -1).numpy()[..., None]
    np.testing.assert_allclose(head - norms, plain, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("steps", [0, 2])
def test_query_views_average_the_logits_of_each_view_of_the_queries(monkeypatch, steps):
    # Under support batch norm each view of the queries is scored on its own, so the averaged
    # logits are the mean of two runs, one per view of the queries; the support set (and the
    # fine-tuning, which sees only it) is the same in both.
    monkeypatch.setattr(adaptation, "VIEWS", ("identity", "shift_down"))
    weights, apply = tiny()
    batch = episode(8)
    options = dict(steps=steps, lr=0.1, views=2, bn="support")
    averaged = adaptation.logits(apply, weights, batch, 3, query_views=True, **options).numpy()
    queries = batch[2].shape[1]
    shifted = adaptation.augment(batch[2], adaptation.view_matrices(2, 10, 10))[:, queries:]
    per_view = [adaptation.logits(apply, weights, (batch[0], batch[1], q, batch[3]), 3,
                                  **options).numpy()
                for q in (batch[2], shifted)]
    np.testing.assert_allclose(averaged, np.mean(per_view, axis=0), rtol=1e-10, atol=1e-10)
    assert np.abs(averaged - per_view[0]).max() > 1e-3
    step = adaptation.make_eval_step(apply, 3, query_views=True, jit_compile=False,
                                     episode_chunk=1, **options)    # one episode at a time
    np.testing.assert_array_equal(step(weights, batch)[1].numpy(), averaged.argmax(-1))
    if steps == 0:   # euclidean: the class whose prototype is nearest the mean view embedding
        support_x, support_y = adaptation._views(batch[0], batch[1], 2)
        protos = protonet.prototypes(apply(weights, support_x), support_y, 3)
        views = [adaptation._embed(apply, weights, support_x, q, "support")[1]
                 for q in (batch[2], shifted)]
        nearest = protonet.distances(tf.add_n(views) / 2, protos).numpy().argmin(-1)
        np.testing.assert_array_equal(averaged.argmax(-1), nearest)


def test_ensemble_predicts_the_highest_mean_log_probability_of_its_members():
    # Two differently initialised members with their own metrics and batch norms.
    (w_a, apply_a), (w_b, apply_b) = tiny(seed=0), tiny(seed=1, channels=3)
    batch = episode(9, tasks=3)
    members = [(apply_a, "euclidean", "support"), (apply_b, "cosine", "transductive")]
    options = dict(views=2, query_views=True)
    mean, returned = adaptation.ensemble_logits(members, [w_a, w_b], batch, 3, **options)
    mean = mean.numpy()
    each = [adaptation.logits(apply, w, batch, 3, metric=metric, bn=bn, **options).numpy()
            for (apply, metric, bn), w in zip(members, [w_a, w_b])]
    for got, want in zip(returned, each):
        np.testing.assert_array_equal(got.numpy(), want)
    log_p = [x - np.log(np.exp(x).sum(-1, keepdims=True)) for x in each]
    np.testing.assert_allclose(mean, (log_p[0] + log_p[1]) / 2, rtol=1e-10, atol=1e-10)
    step = adaptation.make_ensemble_eval_step(members, 3, jit_compile=False, **options)
    accuracy, predictions, alone_accuracy = step([w_a, w_b], batch)
    np.testing.assert_array_equal(predictions.numpy(), mean.argmax(-1))
    np.testing.assert_allclose(accuracy.numpy(),
                               (mean.argmax(-1) == batch[3].numpy()).mean(axis=1))
    for i in range(2):      # each member's own accuracy, from the same pass
        np.testing.assert_allclose(alone_accuracy.numpy()[:, i],
                                   (each[i].argmax(-1) == batch[3].numpy()).mean(axis=1))
    assert (predictions.numpy() != each[0].argmax(-1)).any() or \
        (predictions.numpy() != each[1].argmax(-1)).any()
    # One member: exactly that member's own step.
    alone = adaptation.make_ensemble_eval_step(members[:1], 3, jit_compile=False, **options)
    single = adaptation.make_eval_step(apply_a, 3, bn="support", jit_compile=False, **options)
    np.testing.assert_array_equal(alone([w_a], batch)[1].numpy(), single(w_a, batch)[1].numpy())
    with pytest.raises(ValueError, match="2 weight lists for 1 members"):
        alone([w_a, w_b], batch)
    with pytest.raises(ValueError, match="at least one member"):
        adaptation.make_ensemble_eval_step([], 3)


def soft_kmeans_reference(parts, n_way, steps, views):
    """numpy: ``parts`` of (metric, support [B, V*S, D], support_y, queries [B, Q, M, D]); each
    image the mean of its views, a prototype the mean of its support images (weight 1) and of
    every query (weight: the posterior of the members' mean log-probability)."""
    def scores(metric, queries, protos):                          # [B, M, N], mean over views
        if metric == "cosine":
            unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
            d = np.clip(1 - np.einsum("bqmd,bnd->bqmn", unit(queries), unit(protos)), 0, 2)
        else:
            d = ((queries[:, :, :, None] - protos[:, None, None]) ** 2).sum(-1)
        return -d.mean(axis=1)

    def log_softmax(x):
        return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True))
                                                     .sum(-1, keepdims=True))
    images, protos = [], []
    for _, support, support_y, _ in parts:
        b, vs, d = support.shape
        mean = support.reshape(b, views, vs // views, d).mean(1)           # each support image
        labels = support_y[:, :vs // views]
        images.append((mean, labels))
        protos.append(np.stack([np.stack([mean[e][labels[e] == k].mean(0) for k in range(n_way)])
                                for e in range(b)]))
    for step in range(steps + 1):
        out = [scores(metric, queries, p) for (metric, _, _, queries), p in zip(parts, protos)]
        if step == steps:
            return out
        z = np.exp(np.mean([log_softmax(o) for o in out], 0))
        z /= z.sum(-1, keepdims=True)
        protos = []
        for (mean, labels), (_, _, _, queries) in zip(images, parts):
            q = queries.mean(1)
            protos.append(np.stack([np.stack([
                (mean[e][labels[e] == k].sum(0) + (z[e, :, k, None] * q[e]).sum(0))
                / ((labels[e] == k).sum() + z[e, :, k].sum()) for k in range(n_way)])
                for e in range(len(mean))]))


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_transductive_prototypes_are_soft_k_means_over_the_queries(metric):
    # float64, two views of support and queries: 0 steps is the inductive model exactly; 1 and 3
    # refinements equal the numpy soft k-means above, and move the logits.
    weights, apply = tiny()
    batch = episode(4, tasks=2, k_shot=2, queries=5)
    options = dict(views=2, query_views=True, metric=metric, bn="support")
    parts = [(metric, *(t.numpy() for t in adaptation.embeddings(
        apply, weights, batch, views=2, query_views=True, bn="support")))]
    inductive = adaptation.logits(apply, weights, batch, 3, **options).numpy()
    np.testing.assert_allclose(soft_kmeans_reference(parts, 3, 0, 2)[0], inductive,
                               rtol=1e-10, atol=1e-10)
    member = [(apply, metric, "support")]
    for steps in (1, 3):
        got, own = adaptation.ensemble_logits(member, [weights], batch, 3, views=2,
                                              query_views=True, transductive_steps=steps)
        want = soft_kmeans_reference(parts, 3, steps, 2)[0]
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-10)
        np.testing.assert_array_equal(own[0].numpy(), got.numpy())
        assert np.abs(want - inductive).max() > 1e-3
        step = adaptation.make_eval_step(apply, 3, jit_compile=False, transductive_steps=steps,
                                         **options)
        np.testing.assert_array_equal(step(weights, batch)[1].numpy(), want.argmax(-1))


def test_an_ensemble_refines_its_prototypes_by_its_joint_posterior():
    (w_a, apply_a), (w_b, apply_b) = tiny(seed=0), tiny(seed=1, channels=3)
    batch = episode(5, tasks=2, queries=6)
    members = [(apply_a, "euclidean", "support"), (apply_b, "cosine", "transductive")]
    parts = [(metric, *(t.numpy() for t in adaptation.embeddings(apply, w, batch, views=1,
                                                                  bn=bn)))
             for (apply, metric, bn), w in zip(members, [w_a, w_b])]
    mean, own = adaptation.ensemble_logits(members, [w_a, w_b], batch, 3, transductive_steps=2)
    joint = soft_kmeans_reference(parts, 3, 2, 1)
    log_p = [x - np.log(np.exp(x).sum(-1, keepdims=True)) for x in joint]
    np.testing.assert_allclose(mean.numpy(), (log_p[0] + log_p[1]) / 2, rtol=1e-9, atol=1e-10)
    for got, part in zip(own, parts):             # each member's line: its own refinement alone
        np.testing.assert_allclose(got.numpy(), soft_kmeans_reference([part], 3, 2, 1)[0],
                                   rtol=1e-9, atol=1e-10)
    assert np.abs(own[0].numpy() - joint[0]).max() > 1e-6


def test_refinement_by_the_queries_helps_one_shot_prototypes_of_separated_classes():
    # Identity embedding of 5 well-separated Gaussian classes in 8 dimensions, 1 shot, 15
    # queries a class: a single support image is a noisy prototype, the queries' soft
    # assignments pull it to the class mean (accuracy 0.71 -> 0.86 over 40 episodes when written).
    rng = np.random.default_rng(3)
    tasks, n_way, queries, dim = 40, 5, 15, 8
    centres = rng.normal(0, 1.2, (tasks, n_way, dim))
    support_y = np.tile(np.arange(n_way, dtype=np.int32), (tasks, 1))
    query_y = np.tile(np.repeat(np.arange(n_way, dtype=np.int32), queries), (tasks, 1))
    support_x = centres + rng.normal(0, 1, centres.shape)
    query_x = np.take_along_axis(centres, query_y[:, :, None], 1) \
        + rng.normal(0, 1, (tasks, n_way * queries, dim))
    batch = tuple(tf.constant(a) for a in (support_x.reshape(tasks, n_way, dim, 1, 1), support_y,
                                           query_x.reshape(tasks, -1, dim, 1, 1), query_y))

    def identity(weights, x, bn_rows=None):
        return tf.reshape(x, [x.shape[0], x.shape[1], -1]) * weights[0]
    scores = {}
    for steps in (0, 3):
        step = adaptation.make_eval_step(identity, n_way, transductive_steps=steps,
                                         jit_compile=False)
        scores[steps] = float(np.mean(step([tf.constant(1.0, tf.float64)], batch)[0]))
    assert scores[3] > scores[0] + 0.1, scores


def test_fine_tuning_loss_gradient_matches_finite_differences():
    weights, apply = tiny(channels=3)
    support_x, support_y, _, _ = episode(4)
    rng = np.random.default_rng(5)
    head = (tf.constant(rng.normal(size=(2, 3, 12))), tf.constant(rng.normal(size=(2, 3))))
    params = [tf.broadcast_to(w, [2] + w.shape) + 0.0 for w in weights] + list(head)

    def total(p):
        return tf.reduce_sum(adaptation.support_loss(apply, p, support_x, support_y))
    with tf.GradientTape() as tape:
        tape.watch(params)
        value = total(params)
    grads = tape.gradient(value, params)
    directions = [tf.constant(rng.normal(size=p.shape)) for p in params]
    eps = 1e-6
    plus = total([p + eps * d for p, d in zip(params, directions)])
    minus = total([p - eps * d for p, d in zip(params, directions)])
    numeric = (plus - minus).numpy() / (2 * eps)
    analytic = sum(float(tf.reduce_sum(g * d)) for g, d in zip(grads, directions))
    assert abs(numeric - analytic) < 1e-7 * max(1.0, abs(analytic)), (numeric, analytic)
    # Each episode's gradient is its own: the other episode's weights get none of it.
    with tf.GradientTape() as tape:
        tape.watch(params)
        first = adaptation.support_loss(apply, params, support_x, support_y)[0]
    assert all(float(tf.reduce_max(tf.abs(g[1]))) == 0.0 for g in tape.gradient(first, params))


def test_support_batch_norm_scores_each_query_alone_after_fine_tuning():
    weights, apply = tiny()
    batch = episode(6)
    changed = batch[2].numpy().copy()
    changed[:, 1:] = np.random.default_rng(9).uniform(0, 1, changed[:, 1:].shape)
    other = (batch[0], batch[1], tf.constant(changed), batch[3])
    for bn, alone in (("support", True), ("transductive", False)):
        a = adaptation.logits(apply, weights, batch, 3, steps=2, lr=0.1, views=2, bn=bn).numpy()
        b = adaptation.logits(apply, weights, other, 3, steps=2, lr=0.1, views=2, bn=bn).numpy()
        assert np.allclose(a[:, 0], b[:, 0], rtol=1e-10, atol=1e-10) == alone


def patch_classes(num_classes, per_class, seed=0):
    """Classes told apart only by a faint 3x3 patch under strong per-image noise: an untrained
    embedding's prototypes mostly see the noise."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(num_classes):
        x = rng.uniform(0, 100, (per_class,) + SHAPE) + 80
        x[:, 2:5, 2:5] += rng.uniform(-60, 60, (3, 3, 1)) + 60
        images.append(np.clip(np.round(x), 0, 255).astype(np.uint8))
    names = [f"c{c}" for c in range(num_classes)]
    return data.ClassData(images, names, names)


def test_fine_tuning_improves_an_under_trained_embedding():
    # Untrained weights, 5-way 5-shot: 20 steps on the support sets must score the queries of
    # 20 episodes better than the prototypes do (0.42 -> 0.53 when written).
    batch = episodes.EpisodeSampler(patch_classes(40, 20), 5, 5, 5, meta_batch=20,
                                    seed=1).batch(0)
    init, apply = nets.conv4(None, channels=8, in_shape=SHAPE, pool="max", blocks=2)
    weights = init(1)
    scores = {}
    for steps in (0, 20):
        step = adaptation.make_eval_step(apply, 5, steps=steps, lr=0.1, jit_compile=False,
                                         bn="support")
        scores[steps] = float(np.mean(step(weights, batch)[0]))
    assert scores[20] > scores[0] + 0.05, scores


def test_fine_tuning_in_chunks_of_episodes_equals_all_at_once():
    weights, apply = tiny()
    batch = episode(7, tasks=4)
    whole = adaptation.logits(apply, weights, batch, 3, steps=2, lr=0.1, views=2, bn="support")
    for chunk in (1, 3):        # 3 runs chunks of 2, the largest divisor of 4 up to 3
        step = adaptation.make_eval_step(apply, 3, steps=2, lr=0.1, views=2, bn="support",
                                         jit_compile=False, episode_chunk=chunk)
        _, predictions = step(weights, batch)
        np.testing.assert_array_equal(predictions.numpy(), np.argmax(whole.numpy(), -1))
    parts = adaptation.in_chunks(
        lambda e: adaptation.logits(apply, weights, e, 3, steps=2, lr=0.1, views=2,
                                    bn="support"), batch, 2)
    np.testing.assert_allclose(parts.numpy(), whole.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options, match", [
    (dict(steps=-1), "--finetune_steps"), (dict(steps=2, lr=0.0), "--finetune_lr"),
    (dict(views=10), "--tta"), (dict(steps=1, lr=0.1, metric="cosine"), "euclidean"),
    (dict(query_views=True), "--tta_queries.*--tta=2"),
    (dict(transductive_steps=-1), "--transductive_steps"),
    (dict(transductive_steps=21), r"--transductive_steps.*\[0, 20\]"),
    (dict(transductive_steps=2, steps=1, lr=0.1), "--transductive_steps.*--finetune_steps"),
])
def test_bad_options_name_their_flag(options, match):
    _, apply = tiny()
    with pytest.raises(ValueError, match=match):
        adaptation.make_eval_step(apply, 3, **options)


@pytest.mark.parametrize("method", ["nn", "class_mean"])
@pytest.mark.parametrize("option", ["--tta=2", "--tta_queries", "--finetune_steps=1",
                                    "--transductive_steps=1"])
def test_fm_eval_refuses_adaptation_for_a_fixed_rule(method, option):
    """A rule has no embedding or prototypes to adapt: the option is refused, not ignored."""
    from absl import app
    from benchmarks import evaluate
    with pytest.raises(app.UsageError, match=f"--method={method} .*nothing to adapt"):
        run_binary(evaluate, [f"--method={method}", "--data=synthetic", option])


@pytest.mark.slow
def test_fm_eval_finetune_and_tta_flags(tmp_path, capsys):
    from absl import app
    from benchmarks import evaluate, train
    run_binary(train, ["--algorithm=protonet", "--data=synthetic", "--n_way=5", "--q_query=2",
                       "--channels=4", "--steps=1", "--val_every=0", "--checkpoint_every=1",
                       f"--out_dir={tmp_path}"])
    common = [f"--checkpoint={tmp_path}", "--n_way=3", "--num_episodes=2", "--q_query=2"]
    with pytest.raises(app.UsageError, match="--finetune_lr"):
        run_binary(evaluate, common + ["--finetune_steps=2", "--finetune_lr=0"])
    capsys.readouterr()
    run_binary(evaluate, common + ["--finetune_steps=2", "--tta=3", "--bn=support"])
    assert "fine-tuned 2 steps at 0.01, 3 support views" in capsys.readouterr().out
    with pytest.raises(app.UsageError, match="--tta_queries"):
        run_binary(evaluate, common + ["--tta_queries"])
    run_binary(evaluate, common + ["--tta=2", "--tta_queries", "--bn=support"])
    assert "2 support views, queries too" in capsys.readouterr().out
    with pytest.raises(app.UsageError, match="--transductive_steps.*--finetune_steps"):
        run_binary(evaluate, common + ["--transductive_steps=2", "--finetune_steps=1"])
    run_binary(evaluate, common + ["--transductive_steps=2"])
    out = capsys.readouterr().out
    assert "batch norm, prototypes refined 2 times by the queries (transductive))" in out
    with pytest.raises(app.UsageError, match="--ensemble needs"):
        run_binary(evaluate, common + ["--ensemble"])
    other = tmp_path / "other"
    run_binary(train, ["--algorithm=protonet", "--data=synthetic", "--n_way=5", "--q_query=2",
                       "--channels=3", "--steps=1", "--val_every=0", "--checkpoint_every=1",
                       "--seed=1", f"--out_dir={other}"])
    capsys.readouterr()
    both = common + [f"--checkpoint={tmp_path},{other}", "--tta=2", "--json"]

    def printed():
        return json_lines(capsys.readouterr().out)
    run_binary(evaluate, both)
    apart = printed()
    run_binary(evaluate, both + ["--ensemble"])
    together = printed()
    assert [line["name"] for line in together[:2]] == [line["name"] for line in apart]
    for alone, member in zip(apart, together):     # the same episodes, the same figures
        assert member["accuracy"] == pytest.approx(alone["accuracy"], abs=1e-6)
    assert together[2]["name"] == "ensemble of 2 protonet checkpoints"
    assert len(together[2]["checkpoint"]) == 2 and 0 <= together[2]["accuracy"] <= 1
