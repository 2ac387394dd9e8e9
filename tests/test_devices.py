"""The device-dependent choices (functional_meta.devices): the GPU forms, traced on this CPU with
``devices.target('gpu')``, give the CPU forms' values and derivatives in float64; the barrier is
in the CPU graph only; bfloat16 products are an option, off by default.

The GPU form's grouped convolutions run on a CPU under XLA only: TensorFlow's own CPU kernels
have no gradient for grouped convolutions (its GPU kernels do), so those checks compile."""

import re

import numpy as np
import pytest
import tensorflow as tf

from functional_meta import devices, maml, nets, presets, protonet, training
from test_maml import directional_check

F64 = tf.float64


def tiny_net(pool="stride"):
    # One input channel: the first block is the patch-statistics path on a CPU target; four in the
    # second block: patches times per-task kernels (CPU) or a grouped convolution (GPU).
    return nets.conv4(n_way=3, channels=4, in_shape=(7, 7, 1), pool=pool, blocks=2)


def tasks(dtype=F64, t=3, way=3, shot=2, seed=0):
    rng = np.random.default_rng(seed)
    sx = rng.normal(size=(t, way * shot, 7, 7, 1))
    qx = rng.normal(size=(t, way * shot, 7, 7, 1))
    y = np.tile(np.repeat(np.arange(way, dtype=np.int32), shot), (t, 1))
    return (tf.constant(sx, dtype), tf.constant(y), tf.constant(qx, dtype),
            tf.constant(y[:, ::-1].copy()))


def on(kind, fn, *args):
    with devices.target(kind):
        return fn(*args)


def close(a, b, rtol=1e-11, atol=1e-12):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def test_bad_kind_and_precision_are_named():
    with pytest.raises(ValueError, match=r"device kind must be one of \['cpu', 'gpu'\], got 'tpu'"):
        with devices.target("tpu"):
            pass
    with pytest.raises(ValueError, match=r"precision must be one of \['float32', 'bfloat16'\]"):
        with devices.precision("float16"):
            pass
    with pytest.raises(ValueError, match=r"unknown device choices \['im2col'\]; the choices are"):
        with devices.changed(im2col=False):
            pass


def test_kind_follows_the_target_and_the_placement():
    visible = "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
    assert devices.kind() == visible
    with devices.target("gpu"):
        assert devices.kind() == "gpu" and devices.choices() == devices.CHOICES["gpu"]
        with devices.target("cpu"):
            assert devices.kind() == "cpu"
        assert devices.kind() == "gpu"
        with devices.changed(patches=True):
            assert devices.choices() == devices.CHOICES["gpu"]._replace(patches=True)
        assert devices.choices() == devices.CHOICES["gpu"]
    assert devices.kind() == visible
    with tf.device("/CPU:0"):
        assert devices.kind() == "cpu"
    seen = []
    tf.function(lambda: seen.append(devices.kind()) or tf.constant(0))()
    with devices.target("gpu"):
        tf.function(lambda: seen.append(devices.kind()) or tf.constant(0))()
    assert seen == [visible, "gpu"]


@pytest.mark.parametrize("stride", [1, 2])
def test_grouped_convolution_equals_patches(stride):
    """``_conv3x3`` of per-task kernels, and its first and second derivatives, in both forms."""
    rng = np.random.default_rng(stride)
    x = tf.constant(rng.normal(size=(3, 2, 7, 7, 5)))
    kernel = tf.constant(rng.normal(size=(3, 3, 3, 5, 4)))
    v = tf.constant(rng.normal(size=(3, 2) + ((7, 7) if stride == 1 else (4, 4)) + (4,)))

    def parts(x, kernel):
        with tf.GradientTape() as outer:
            outer.watch([x, kernel])
            with tf.GradientTape() as inner:
                inner.watch([x, kernel])
                y = nets._conv3x3(x, kernel, stride)
                value = tf.reduce_sum(tf.tanh(y) * v)
            gx, gk = inner.gradient(value, [x, kernel])
            mixed = tf.reduce_sum(gx ** 2) + tf.reduce_sum(gk * kernel)
        return [y, gx, gk] + outer.gradient(mixed, [x, kernel])

    compiled = tf.function(parts, jit_compile=True)
    cpu, gpu = on("cpu", compiled, x, kernel), on("gpu", compiled, x, kernel)
    for a, b in zip(cpu, gpu):
        close(a, b)


@pytest.mark.slow
def test_gpu_graph_gives_the_cpu_meta_gradient_and_matches_finite_differences():
    """Second order through a MAML inner step in float64: the GPU graph (grouped convolutions,
    plain kernel gradients) compiled on this CPU equals the CPU form (patches; eager, which
    tests/test_maml.py checks against the CPU graph's barrier and wide products under XLA) and
    matches central differences of its own meta-loss. (Stride-2 blocks: XLA has no float64
    second derivative of max pooling.)"""
    init, apply = tiny_net()
    weights, batch = init(0, F64), tasks(t=2)
    kw = dict(inner_lr=0.4, inner_steps=1)

    def meta(w):
        return maml.meta_gradients(apply, w, batch, **kw)

    gpu_loss, gpu_grads = on("gpu", tf.function(meta, jit_compile=True), weights)
    cpu_loss, cpu_grads = on("cpu", meta, weights)
    close(gpu_loss, cpu_loss)
    for a, b in zip(gpu_grads, cpu_grads):
        close(a, b, atol=1e-11)
    with devices.target("gpu"):
        loss = tf.function(lambda w: maml.meta_loss(apply, w, batch, **kw)[0], jit_compile=True)
        directional_check(lambda w: float(loss(w)), gpu_grads, weights,
                          np.random.default_rng(2), directions=2)


def step_hlo(kind, precision="float32", dtype=tf.float32):
    """The HLO of a small MAML train step traced for ``kind`` (not compiled)."""
    init, apply = tiny_net()
    with devices.target(kind), devices.precision(precision):
        state, batch = maml.init_state(init(0, dtype)), tasks(dtype)
        step = maml.make_train_step(apply, inner_steps=1)
        hlo = step.experimental_get_compiler_ir(state, batch)(stage="hlo")
    # Without the trace's name (a counter): the program.
    return re.sub(r"inference_step_\d+", "step", hlo)


def test_barrier_only_in_the_cpu_graph_and_grouped_convolutions_only_in_the_gpu_graph():
    cpu, gpu = step_hlo("cpu"), step_hlo("gpu")
    assert "opt-barrier" in cpu and "opt-barrier" not in gpu
    assert "feature_group_count=3" not in cpu and "feature_group_count=3" in gpu


def test_task_chunks_and_xla_defaults_follow_the_target():
    config = presets.get("maml_omniglot_5way")
    config["net"] = "conv4"
    assert on("cpu", training.default_task_chunk, config) == 8
    assert on("gpu", training.default_task_chunk, config) is None
    for algorithm, cpu, gpu in [("maml", True, True), ("protonet", False, True),
                                ("mann", False, True)]:
        assert on("cpu", training.default_jit, algorithm) is cpu
        assert on("gpu", training.default_jit, algorithm) is gpu


def test_bfloat16_products_are_off_by_default_and_within_tolerance_of_float32():
    assert "bf16" not in step_hlo("cpu") and "bf16[" in step_hlo("cpu", "bfloat16")
    init, apply = tiny_net()
    weights, batch = init(0), tasks(tf.float32)
    results = {}
    for name in devices.PRECISIONS:
        with devices.precision(name):
            results[name] = tf.function(lambda w: maml.meta_gradients(
                apply, w, batch, inner_lr=0.4, inner_steps=1))(weights)
    (loss32, grads32), (loss16, grads16) = results["float32"], results["bfloat16"]
    flat32 = np.concatenate([g.numpy().ravel() for g in grads32])
    flat16 = np.concatenate([g.numpy().ravel() for g in grads16])
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9) of every product's inputs and
    # result: the loss within 1%, and the second-order meta-gradient, through batch norm's
    # differences of rounded values, within 25% in norm (0.107 measured for this net). A bf16
    # step that differs from float32 not at all (the option ignored) fails too.
    close(loss16, loss32, rtol=1e-2, atol=0)
    error = np.linalg.norm(flat16 - flat32) / np.linalg.norm(flat32)
    assert 1e-4 < error < 0.25, error


def test_bfloat16_setting_leaves_float64_untouched():
    # The GPU graph: its convolutions and the head's products go through the precision setting.
    plain = step_hlo("gpu", dtype=F64)
    assert step_hlo("gpu", precision="bfloat16", dtype=F64) == plain and "bf16" not in plain


def test_protonet_gpu_form_equals_cpu_form_in_float64():
    """A shared kernel with one input channel: on a GPU target the first block is a convolution
    and batch norm, not the patch statistics."""
    init, apply = nets.conv4(None, channels=4, in_shape=(7, 7, 1), pool="max", blocks=2)
    weights = init(0, F64)
    sx, sy, qx, qy = tasks(t=1)

    def loss_and_grads(w):
        with tf.GradientTape() as tape:
            tape.watch(w)
            logits = protonet.logits(apply, w, sx, sy, qx, 3)
            loss = tf.reduce_mean(maml.cross_entropy(logits, qy))
        return [loss] + tape.gradient(loss, w)

    for a, b in zip(on("cpu", loss_and_grads, weights), on("gpu", loss_and_grads, weights)):
        close(a, b)


def test_precision_flag_and_default_modes_of_the_benchmarks():
    from absl import flags

    from benchmarks import flag_groups, runner
    assert flag_groups.parse_flags("maml", []).precision == "float32"
    assert flag_groups.parse_flags("protonet", ["--precision=bfloat16"]).precision == "bfloat16"
    with pytest.raises(flags.Error, match="precision"):
        flag_groups.parse_flags("maml", ["--precision=float16"])
    assert [runner.default_mode(f, d) for f in ("maml", "protonet") for d in devices.KINDS] \
        == ["xla", "xla", "function", "xla"]
