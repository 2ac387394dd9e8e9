"""ResNet-12 (nets.resnet12): against a plain tf.nn reference, per-task weights, finite
differences to second order, support-only batch norm, FLOP counts, and the binaries' --backbone."""

import json

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from benchmarks import evaluate as eval_bin
from benchmarks import flag_groups
from benchmarks import train as train_bin
from functional_meta import flops, maml, nets, presets, protonet
from test_benchmarks import _tasks, compiled_flops
from test_maml import directional_check
from _binaries import json_lines, run_binary

F64 = tf.float64
TINY = (3, 4, 2, 5)              # widths of the small networks below


def reference(weights, x, bn_rows=None, head=False):
    """ResNet-12 on one task's images ``x [n, H, W, C]`` written with plain tf.nn ops in the
    published order (leaky ReLU, then pooling); batch norm from the first ``bn_rows`` images."""
    def bn(y, scale, offset):
        mean, var = tf.nn.moments(y if bn_rows is None else y[:bn_rows], axes=[0, 1, 2])
        return tf.nn.batch_normalization(y, mean, var, offset, scale, nets.BN_EPSILON)

    for b in range(4):
        k1, s1, o1, k2, s2, o2, k3, s3, o3, kc, sc, oc = weights[12 * b:12 * b + 12]
        y = tf.nn.leaky_relu(bn(tf.nn.conv2d(x, k1, 1, "SAME"), s1, o1), 0.1)
        y = tf.nn.leaky_relu(bn(tf.nn.conv2d(y, k2, 1, "SAME"), s2, o2), 0.1)
        y = bn(tf.nn.conv2d(y, k3, 1, "SAME"), s3, o3) + bn(tf.nn.conv2d(x, kc, 1, "VALID"), sc, oc)
        x = tf.nn.max_pool2d(tf.nn.leaky_relu(y, 0.1), 2, 2, "VALID")
    x = tf.reshape(x, [x.shape[0], -1])
    return x @ weights[-2] + weights[-1] if head else x


def random_weights(init, rng, tasks=None):
    """``init``'s shapes filled with normal values (scales and offsets away from 1 and 0), with a
    leading task axis when ``tasks``."""
    lead = [tasks] if tasks else []
    return [tf.constant(rng.normal(scale=0.5, size=lead + w.shape.as_list()) + 0.2)
            for w in init(0, F64)]


@pytest.mark.parametrize("channels", [2, 5])       # patch statistics (<= 3 channels), convolution
@pytest.mark.parametrize("head", [False, True])
def test_resnet12_matches_a_plain_tf_nn_reference(channels, head):
    # 18x17: odd sizes floor at every pooling (18 -> 9 -> 4 -> 2 -> 1, 17 -> 8 -> 4 -> 2 -> 1).
    init, apply = nets.resnet12(3 if head else None, widths=TINY, in_shape=(18, 17, channels))
    rng = np.random.default_rng(channels)
    weights = random_weights(init, rng)
    x = tf.constant(rng.normal(size=(2, 6, 18, 17, channels)))
    got = apply(weights, x)
    assert got.shape == (2, 6, 3 if head else init.embedding_size)
    for t in range(2):
        np.testing.assert_allclose(got[t], reference(weights, x[t], head=head), rtol=1e-9,
                                   atol=1e-9)
    # One batch without a task axis: the same as a task of its own.
    np.testing.assert_allclose(apply(weights, x[1]), got[1], rtol=1e-12, atol=1e-12)
    # float32 takes TensorFlow's fused batch norm for one task with shared weights.
    w32 = [tf.cast(w, tf.float32) for w in weights]
    np.testing.assert_allclose(apply(w32, tf.cast(x[0], tf.float32)), got[0], rtol=1e-3,
                               atol=1e-3 * float(tf.reduce_max(tf.abs(got[0]))))


def test_resnet12_per_task_weights_equal_a_loop_over_tasks():
    init, apply = nets.resnet12(4, widths=TINY, in_shape=(16, 16, 1))
    rng = np.random.default_rng(1)
    per_task = random_weights(init, rng, tasks=3)
    x = tf.constant(rng.normal(size=(3, 5, 16, 16, 1)))
    together = apply(per_task, x)
    for t in range(3):
        alone = apply([w[t] for w in per_task], x[t])
        np.testing.assert_allclose(together[t], alone, rtol=1e-10, atol=1e-10)
    # Traced, per-task weights broadcast from one shared set (MAML's first inner step) take the
    # shared products (nets._task_matmul): still the same values.
    shared = random_weights(init, rng)
    broadcast = tf.function(lambda w, x: apply([tf.broadcast_to(v, [3, *v.shape]) for v in w], x))
    np.testing.assert_allclose(broadcast(shared, x), apply(shared, x), rtol=1e-10, atol=1e-10)


def test_resnet12_support_statistics_score_each_query_alone():
    init, apply = nets.resnet12(None, widths=TINY, in_shape=(16, 16, 4))
    rng = np.random.default_rng(2)
    weights = random_weights(init, rng)
    x = rng.normal(size=(2, 7, 16, 16, 4))
    got = apply(weights, tf.constant(x), bn_rows=3)
    for t in range(2):
        np.testing.assert_allclose(got[t], reference(weights, tf.constant(x[t]), bn_rows=3),
                                   rtol=1e-9, atol=1e-9)
    # Changing one query changes no other image's embedding; with the batch's statistics it does.
    moved = x.copy()
    moved[:, 5] += 3.0
    again = apply(weights, tf.constant(moved), bn_rows=3)
    keep = [0, 1, 2, 3, 4, 6]
    np.testing.assert_allclose(tf.gather(again, keep, axis=1), tf.gather(got, keep, axis=1),
                               rtol=1e-12, atol=1e-12)
    batch = apply(weights, tf.constant(x)) - apply(weights, tf.constant(moved))
    assert float(tf.reduce_max(tf.abs(tf.gather(batch, keep, axis=1)))) > 1e-3
    # All rows: the batch's own statistics, as without bn_rows.
    np.testing.assert_allclose(apply(weights, tf.constant(x), bn_rows=7),
                               apply(weights, tf.constant(x)), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="bn_rows"):
        apply(weights, tf.constant(x), bn_rows=8)


@pytest.mark.parametrize("per_task", [False, True])
def test_resnet12_gradient_matches_finite_differences(per_task):
    init, apply = nets.resnet12(3, widths=(2, 2, 3, 2), in_shape=(16, 16, 2))
    rng = np.random.default_rng(3)
    weights = random_weights(init, rng, tasks=2 if per_task else None)
    x = tf.constant(rng.normal(size=(2, 4, 16, 16, 2)))
    probe = tf.constant(rng.normal(size=(2, 4, 3)))
    loss = lambda w: float(tf.reduce_sum(tf.tanh(apply(w, x)) * probe))
    with tf.GradientTape() as tape:
        tape.watch(weights)
        value = tf.reduce_sum(tf.tanh(apply(weights, x)) * probe)
    directional_check(loss, tape.gradient(value, weights), weights, rng)


def test_resnet12_maml_meta_gradient_matches_finite_differences():
    # Second order: the meta-gradient differentiates through an inner gradient step of the net.
    init, apply = nets.resnet12(3, widths=(2, 2, 2, 2), in_shape=(16, 16, 1))
    rng = np.random.default_rng(4)
    weights = random_weights(init, rng)
    labels = np.tile(np.arange(3), (2, 2)).astype(np.int32)
    tasks = (tf.constant(rng.normal(size=(2, 6, 16, 16, 1))), tf.constant(labels),
             tf.constant(rng.normal(size=(2, 6, 16, 16, 1))), tf.constant(labels[:, ::-1].copy()))
    kw = dict(inner_lr=0.3, inner_steps=1)
    _, grads = maml.meta_gradients(apply, weights, tasks, **kw)
    directional_check(lambda w: float(maml.meta_loss(apply, w, tasks, **kw)[0]), grads, weights,
                      rng, directions=2)


def test_resnet12_weight_shapes_and_bad_arguments():
    init, apply = nets.resnet12(5)
    shapes = [tuple(w.shape) for w in init(0)]
    assert len(shapes) == 4 * 12 + 2 and init.embedding_size == 640
    assert shapes[:12] == [(3, 3, 1, 64), (64,), (64,), (3, 3, 64, 64), (64,), (64,),
                           (3, 3, 64, 64), (64,), (64,), (1, 1, 1, 64), (64,), (64,)]
    assert shapes[36] == (3, 3, 320, 640) and shapes[-2:] == [(640, 5), (5,)]
    assert nets.resnet12(None, in_shape=(84, 84, 3))[0].embedding_size == 5 * 5 * 640
    np.testing.assert_array_equal(nets.resnet12(5)[0](0)[0], init(0)[0])
    assert not np.array_equal(init(1)[0], init(0)[0])
    for call, match in [(lambda: nets.resnet12(5, widths=(8, 8, 8)), "widths"),
                        (lambda: nets.resnet12(5, widths=(8, 8, 0, 8)), "widths"),
                        (lambda: nets.resnet12(5, in_shape=(15, 28, 1)), "too small"),
                        (lambda: nets.resnet12(0), "n_way"),
                        (lambda: apply(init(0), tf.zeros([2, 32, 32, 1])), r"\(28, 28, 1\)")]:
        with pytest.raises(ValueError, match=match):
            call()


def test_resnet12_flops_match_a_hand_count_and_the_compiled_convolutions():
    # 16x16x4 input, widths 3-4-2-5, blocks at 16x16, 8x8, 4x4, 2x2; 3-way head on 1x1x5.
    # Widths of at least 4 (channels=4): every convolution runs as one (nets computes those of
    # inputs with at most three channels as products of patches).
    config = dict(family="maml", net="resnet12", channels=4, image_shape=(16, 16, 4), n_way=3)
    assert presets.resnet12_widths(4) == (4, 10, 20, 40) and presets.resnet12_widths(64) == \
        (64, 160, 320, 640)
    layers = flops.resnet12_layers((16, 16, 4), TINY, n_way=3)
    hand = [18 * 4 * 3 * 256, 18 * 3 * 3 * 256, 18 * 3 * 3 * 256, 2 * 4 * 3 * 256,
            18 * 3 * 4 * 64, 18 * 4 * 4 * 64, 18 * 4 * 4 * 64, 2 * 3 * 4 * 64,
            18 * 4 * 2 * 16, 18 * 2 * 2 * 16, 18 * 2 * 2 * 16, 2 * 4 * 2 * 16,
            18 * 2 * 5 * 4, 18 * 5 * 5 * 4, 18 * 5 * 5 * 4, 2 * 2 * 5 * 4, 2 * 5 * 3]
    assert layers == hand
    assert flops.network_layers(config) == flops.resnet12_layers((16, 16, 4), (4, 10, 20, 40), 3)
    # The input feeds the first convolution and the first shortcut: neither input gradient counts.
    assert flops.gradient(config) == 3 * flops.forward(config) \
        - flops.network_layers(config)[0] - flops.network_layers(config)[3]
    # ProtoNet's compiled step (unoptimised HLO, as test_benchmarks' conv4 check): it still holds
    # the two input gradients that XLA prunes later and the analytic count leaves out.
    proto = dict(config, family="protonet", k_shot=2, q_query=1, meta_batch=2)
    init, apply = presets.network(proto)
    step = protonet.make_train_step(apply, 3)
    hlo = step.compiled.experimental_get_compiler_ir(protonet.init_state(init(0)),
                                                     _tasks(proto))(stage="hlo")
    images = 2 * 3 * (2 + 1)
    assert compiled_flops(hlo, ops=("convolution",)) == \
        flops.protonet_step(proto) + images * flops.input_layers(proto)


# ---------------------------------------------------------------------------------------------
# The binaries


@pytest.mark.parametrize("argv, names", [
    (["--algorithm=protonet", "--backbone=resnet18"], "--backbone"),
    (["--algorithm=protonet", "--backbone=resnet12", "--pool=max"], "--backbone.*pool"),
    (["--algorithm=mann", "--backbone=resnet12"], "--backbone.*mann/lstm must be 'conv4'"),
    (["--algorithm=maml_rl", "--backbone=conv4"], "--backbone.*policy"),
    (["--algorithm=protonet", "--backbone=resnet12", "--channels=0"], "--channels"),
])
def test_train_refuses_bad_backbone_flags_while_parsing(argv, names, tmp_path):
    # Errors of flag parsing: raised before main, hence before TensorFlow would be loaded.
    with pytest.raises(flags.Error, match=names):
        run_binary(train_bin, argv + [f"--out_dir={tmp_path}"])
    assert not list(tmp_path.iterdir())


def test_protonet_bench_takes_resnet12():
    fv = flag_groups.parse_flags("protonet", ["--net=resnet12", "--channels=8"])
    config = flag_groups.config_from_flags("protonet", fv)
    # Widths 8-20-40-80; the last block at 3x3 (28 -> 14 -> 7 -> 3): its third convolution and
    # its shortcut, no head.
    assert config["net"] == "resnet12"
    assert flops.network_layers(config)[-2:] == [2 * 9 * 80 * 80 * 9, 2 * 40 * 80 * 9]
    with pytest.raises(flags.Error, match="pool"):
        flag_groups.parse_flags("protonet", ["--net=resnet12", "--pool=max"])


# MAML's steps (no XLA: compiling a ResNet-12 MAML step takes minutes on a CPU) trace for
# about a minute on a shared 2-core machine: slow.
@pytest.mark.parametrize("algorithm, jit", [
    ("protonet", []), pytest.param("fomaml", ["--nojit"], marks=pytest.mark.slow)])
def test_train_a_resnet12_then_evaluate_it(algorithm, jit, tmp_path, capsys):
    out = tmp_path / "run"
    run_binary(train_bin, [f"--algorithm={algorithm}", "--data=synthetic", "--backbone=resnet12",
                           "--channels=2", "--n_way=3", "--k_shot=1", "--q_query=2",
                           "--meta_batch=2", "--steps=2", "--log_every=1", "--val_every=2",
                           "--val_episodes=4", f"--out_dir={out}", *jit])
    config = json.loads((out / "config.json").read_text())
    assert config["net"] == "resnet12" and config["channels"] == 2
    capsys.readouterr()
    run_binary(eval_bin, [f"--checkpoint={out}", "--n_way=3", "--k_shot=1", "--num_episodes=6",
                          "--json", *jit])
    (result,) = json_lines(capsys.readouterr().out)
    assert result["step"] == 2 and result["n_way"] == 3 and 0 <= result["accuracy"] <= 1
