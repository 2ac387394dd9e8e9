import re

import numpy as np
import pytest
import tensorflow as tf

from functional_meta import maml, nets


def np_same_padding(size, stride):
    """TF 'SAME' for a 3-wide window: the output size and the (before, after) padding."""
    out = -(-size // stride)
    total = max((out - 1) * stride + 3 - size, 0)
    return out, (total // 2, total - total // 2)


def np_conv3x3_same(x, k, stride):
    """Straightforward loops: x [n, H, W, C], k [3, 3, C, O], TF 'SAME' padding."""
    n, h, w, c = x.shape
    (oh, pad_h), (ow, pad_w) = np_same_padding(h, stride), np_same_padding(w, stride)
    xp = np.pad(x, [(0, 0), pad_h, pad_w, (0, 0)])
    out = np.zeros([n, oh, ow, k.shape[-1]])
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, i * stride:i * stride + 3, j * stride:j * stride + 3, :]
            out[:, i, j, :] = np.einsum("nabc,abco->no", patch, k)
    return out


def np_conv4(weights, x, pool, blocks, head):
    w = [np.asarray(v, np.float64) for v in weights]
    for b in range(blocks):
        k, scale, offset = w[3 * b:3 * b + 3]
        x = np_conv3x3_same(x, k, 2 if pool == "stride" else 1)
        mean = x.mean(axis=(0, 1, 2))
        var = x.var(axis=(0, 1, 2))
        x = np.maximum((x - mean) / np.sqrt(var + nets.BN_EPSILON) * scale + offset, 0)
        if pool == "max":
            n, h, ww, c = x.shape
            x = x[:, :h // 2 * 2, :ww // 2 * 2].reshape(n, h // 2, 2, ww // 2, 2, c).max(axis=(2, 4))
    x = x.reshape(x.shape[0], -1)
    return x @ w[-2] + w[-1] if head else x


@pytest.mark.parametrize("pool,shape,blocks", [("stride", (9, 9, 2), 3), ("max", (12, 10, 3), 2)])
def test_conv4_matches_reference_loops(pool, shape, blocks):
    init, apply = nets.conv4(n_way=4, channels=5, in_shape=shape, pool=pool, blocks=blocks)
    weights = init(3, dtype=tf.float64)
    x = np.random.default_rng(0).normal(size=(6,) + shape)
    got = apply(weights, tf.constant(x)).numpy()
    np.testing.assert_allclose(got, np_conv4(weights, x, pool, blocks, True), rtol=1e-9, atol=1e-9)


def test_fold_batch_norm_gives_each_image_the_fixed_statistics_output():
    init, apply = nets.conv4(channels=5, in_shape=(12, 10, 2), pool="max", blocks=3)
    rng = np.random.default_rng(4)
    weights = [w + rng.normal(size=w.shape) for w in init(2, tf.float64)]   # scales of both signs
    reference, images = rng.normal(size=(7, 12, 10, 2)), rng.normal(size=(3, 12, 10, 2))
    x = tf.constant(images)
    for kernel, bias in zip(*[iter(nets.fold_batch_norm(weights, reference))] * 2):
        x = tf.nn.max_pool2d(tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "SAME") + bias), 2, 2, "VALID")
    want = apply(weights, np.concatenate([reference, images]), bn_rows=7)[7:]
    np.testing.assert_allclose(tf.reshape(x, [3, -1]), want, rtol=1e-9, atol=1e-12)
    assert np.std(want) > 0.1                            # the features do not vanish
    with pytest.raises(ValueError, match="3 per block"):
        nets.fold_batch_norm(nets.conv4(n_way=2, channels=3)[0](0), reference)


def test_conv4_task_axis_per_task_weights_equal_separate_calls():
    init, apply = nets.conv4(n_way=3, channels=4, in_shape=(8, 8, 1), blocks=2)
    w_a, w_b = init(0, tf.float64), init(1, tf.float64)
    x = tf.constant(np.random.default_rng(1).normal(size=(2, 5, 8, 8, 1)))
    stacked = [tf.stack([a, b]) for a, b in zip(w_a, w_b)]
    got = apply(stacked, x).numpy()
    np.testing.assert_allclose(got[0], apply(w_a, x[0]).numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got[1], apply(w_b, x[1]).numpy(), rtol=1e-10, atol=1e-12)
    # Shared weights over a task axis: batch norm statistics stay per task.
    shared = apply(w_a, x).numpy()
    np.testing.assert_allclose(shared[1], apply(w_a, x[1]).numpy(), rtol=1e-10, atol=1e-12)


def test_conv4_weight_list_shapes_and_embedding_sizes():
    init, apply = nets.conv4(n_way=5)
    shapes = [tuple(w.shape) for w in init(0)]
    assert shapes == [(3, 3, 1, 64), (64,), (64,)] + [(3, 3, 64, 64), (64,), (64,)] * 3 + [(256, 5), (5,)]
    assert nets.conv4(None, pool="max")[0].embedding_size == 64
    init, apply = nets.conv4(None, channels=32, in_shape=(84, 84, 3), pool="max")
    assert init.embedding_size == 800
    assert apply(init(0), tf.zeros([2, 84, 84, 3])).shape == (2, 800)


def test_init_is_deterministic_per_seed_and_dtype():
    init, _ = nets.conv4(n_way=5, channels=8)
    a, b, c = init(7), init(7), init(8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert init(7, tf.float64)[0].dtype == tf.float64
    limit = np.sqrt(6.0 / (9 + 9 * 8))
    assert np.abs(a[0]).max() <= limit and np.abs(a[0]).max() > 0.5 * limit


def test_mlp_matches_numpy_and_task_axis():
    init, apply = nets.mlp([6, 5, 3], in_shape=(2, 3))
    w = init(0, tf.float64)
    x = np.random.default_rng(2).normal(size=(4, 2, 3))
    h = np.maximum(x.reshape(4, 6) @ w[0].numpy() + w[1].numpy(), 0)
    np.testing.assert_allclose(apply(w, tf.constant(x)).numpy(), h @ w[2].numpy() + w[3].numpy())
    stacked = [tf.stack([v, 2 * v]) for v in w]
    xt = tf.constant(np.stack([x, x]))
    np.testing.assert_allclose(apply(stacked, xt)[1].numpy(), apply([2 * v for v in w], x).numpy())
    assert [tuple(v.shape) for v in nets.mlp([1, 40, 40, 1])[0](0)] == [(1, 40), (40,), (40, 40), (40,), (40, 1), (1,)]


@pytest.mark.parametrize("call,match", [
    (lambda: nets.conv4(5, in_shape=(8, 8, 1), pool="max"), "too small"),
    (lambda: nets.conv4(5, pool="avg"), "pool"),
    (lambda: nets.mlp([3]), "sizes"),
    (lambda: nets.mlp([4, 2], in_shape=(3,)), "in_shape"),
    (lambda: nets.conv4(5)[0](-1), "seed"),
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_apply_rejects_wrong_image_shape():
    init, apply = nets.conv4(5)
    with pytest.raises(ValueError, match=r"\(28, 28, 1\)"):
        apply(init(0), tf.zeros([2, 32, 32, 1]))


def _loss_grads_hvp(apply, weights, x, probe, direction):
    """Loss, gradient and Hessian-vector product of a fixed readout of ``apply``."""
    with tf.GradientTape() as outer:
        outer.watch(weights)
        with tf.GradientTape() as inner:
            inner.watch(weights)
            loss = tf.reduce_sum(apply(weights, x) * probe) ** 2
        grads = inner.gradient(loss, weights)
        dot = tf.add_n([tf.reduce_sum(g * d) for g, d in zip(grads, direction)])
    return loss, grads, outer.gradient(dot, weights)


def test_fused_batch_norm_path_matches_exact_path_to_second_order():
    # One task with shared weights in float32 runs TensorFlow's fused batch norm; per-task weights
    # (MAML) and float64 run the explicit formula. Both must give the same loss, gradient and HVP.
    init, apply = nets.conv4(None, channels=6, in_shape=(10, 10, 2), pool="max", blocks=2)
    weights = init(4)
    rng = np.random.default_rng(5)
    x = tf.constant(rng.normal(size=(1, 7, 10, 10, 2)).astype(np.float32))
    probe = tf.constant(rng.normal(size=(1, 7, 24)).astype(np.float32))
    direction = [tf.constant(rng.normal(size=w.shape).astype(np.float32)) for w in weights]
    fused = _loss_grads_hvp(apply, weights, x, probe, direction)
    per_task = [w[None] for w in weights]                  # same values, exact formula
    exact = _loss_grads_hvp(apply, per_task, x, probe, [d[None] for d in direction])
    np.testing.assert_allclose(fused[0], exact[0], rtol=1e-4)
    for a, b in zip(fused[1] + fused[2], exact[1] + exact[2]):
        np.testing.assert_allclose(a, b[0], rtol=2e-3, atol=2e-3 * float(tf.reduce_max(tf.abs(b))))
    graph = tf.function(apply).get_concrete_function(weights, x).graph
    assert any(op.type.startswith("FusedBatchNorm") for op in graph.get_operations())
    graph = tf.function(apply).get_concrete_function(per_task, x).graph
    assert not any(op.type.startswith("FusedBatchNorm") for op in graph.get_operations())


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("per_task", [False, True])
def test_first_block_from_patch_statistics_matches_conv_then_batch_norm(stride, per_task):
    # Inputs with few channels take the patch-statistics block; it must be the same function as
    # the convolution followed by batch norm, to second order (float64).
    rng = np.random.default_rng(6)
    x = tf.constant(rng.normal(size=(3, 5, 9, 8, 2)) * 3.0 + 1.0)
    lead = [3] if per_task else []
    weights = [tf.constant(rng.normal(size=lead + s)) for s in ([3, 3, 2, 4], [4], [4])]
    probe = tf.constant(rng.normal(size=(3, 5, -(-9 // stride), -(-8 // stride), 4)))
    direction = [tf.constant(rng.normal(size=w.shape)) for w in weights]

    def patch_path(w, x):
        return nets._conv_batch_norm_from_patches(x, *w, stride)

    def two_steps(w, x):
        return nets._batch_norm(nets._conv3x3(x, w[0], stride), w[1], w[2])

    got = _loss_grads_hvp(patch_path, weights, x, probe, direction)
    want = _loss_grads_hvp(two_steps, weights, x, probe, direction)
    for a, b in zip([got[0]] + got[1] + got[2], [want[0]] + want[1] + want[2]):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * float(tf.reduce_max(tf.abs(b))))
    # conv4 uses it for the first block only when the input has at most FEW_CHANNELS channels.
    for channels, used in ((nets.FEW_CHANNELS, True), (nets.FEW_CHANNELS + 1, False)):
        init, apply = nets.conv4(None, channels=4, in_shape=(8, 8, channels), blocks=1)
        graph = tf.function(apply).get_concrete_function(init(0), tf.zeros([1, 2, 8, 8, channels]))
        ops = {op.type for op in graph.graph.get_operations()}
        assert ("Conv2D" not in ops) == used


def np_patches(x, stride):
    """im2col with loops: x [T, n, H, W, C] -> [T, n*H'*W', 9*C], TF 'SAME' padding."""
    t, n, h, w, c = x.shape
    (oh, pad_h), (ow, pad_w) = np_same_padding(h, stride), np_same_padding(w, stride)
    xp = np.pad(x, [(0, 0), (0, 0), pad_h, pad_w, (0, 0)])
    out = np.zeros([t, n, oh, ow, 9 * c])
    for i in range(oh):
        for j in range(ow):
            window = xp[:, :, i * stride:i * stride + 3, j * stride:j * stride + 3, :]
            out[:, :, i, j] = window.reshape(t, n, 9 * c)
    return out.reshape(t, n * oh * ow, 9 * c)


def np_col2im(u, x_shape, stride):
    """The adjoint of ``np_patches``: each patch value is added back where it was read."""
    t, n, h, w, c = x_shape
    (oh, pad_h), (ow, pad_w) = np_same_padding(h, stride), np_same_padding(w, stride)
    xp = np.zeros([t, n, h + sum(pad_h), w + sum(pad_w), c])
    u = u.reshape(t, n, oh, ow, 3, 3, c)
    for i in range(oh):
        for j in range(ow):
            xp[:, :, i * stride:i * stride + 3, j * stride:j * stride + 3, :] += u[:, :, i, j]
    return xp[:, :, pad_h[0]:pad_h[0] + h, pad_w[0]:pad_w[0] + w, :]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(6, 6), (7, 5), (4, 9), (1, 2)])
def test_patches_and_their_derivatives_match_reference_loops(size, stride):
    # The patches, their gradient (col2im) and the gradient's own derivative (im2col again), for
    # even and odd sizes: the stride-2 path builds them from phases of the image.
    rng = np.random.default_rng(9)
    shape = (2, 3) + size + (2,)
    x = tf.constant(rng.normal(size=shape))
    got, out_h, out_w = nets._patches(x, stride)
    assert (out_h, out_w) == tuple(np_same_padding(d, stride)[0] for d in size)
    np.testing.assert_array_equal(got.numpy(), np_patches(x.numpy(), stride))
    u = tf.constant(rng.normal(size=got.shape))
    v = tf.constant(rng.normal(size=shape))
    with tf.GradientTape() as outer:
        outer.watch(u)
        with tf.GradientTape() as inner:
            inner.watch(x)
            patches = nets._patches(x, stride)[0]
        col2im = inner.gradient(patches, x, output_gradients=u)
    np.testing.assert_allclose(col2im.numpy(), np_col2im(u.numpy(), shape, stride), rtol=1e-12,
                               atol=1e-12)
    again = outer.gradient(col2im, u, output_gradients=v)
    np.testing.assert_allclose(again.numpy(), np_patches(v.numpy(), stride), rtol=1e-12,
                               atol=1e-12)


def tiny_conv4_meta_batch(channels):
    """A 3-way conv4 on 9x9x1 images and a meta-batch of 2 tasks for it, small enough to compile
    the second-order step in seconds."""
    init, apply = nets.conv4(n_way=3, channels=channels, in_shape=(9, 9, 1))
    rng = np.random.default_rng(0)
    tasks = (tf.constant(rng.random([2, 3, 9, 9, 1]), tf.float32), tf.constant([[0, 1, 2]] * 2),
             tf.constant(rng.random([2, 3, 9, 9, 1]), tf.float32), tf.constant([[2, 1, 0]] * 2))
    return init, apply, tasks


@pytest.mark.slow
def test_kernel_gradient_barriers_are_put_in_under_xla_only():
    """nets._kernel_gradient separates the wide product from its transpose by XLA's optimisation
    barrier when the trace is for XLA, also inside the training step's loop over chunks of tasks,
    and takes the plain product otherwise. (What XLA compiles is checked in the next test; that
    the compiled values are exact, barrier included, test_maml.py checks in float64:
    test_xla_and_plain_meta_gradients_agree, a conv4 under XLA against the eager path.)"""
    init, apply, tasks = tiny_conv4_meta_batch(channels=8)
    state = maml.init_state(init(0), inner_lr=0.4)
    _, gradient, _ = maml.train_step_parts(apply, inner_steps=1, task_chunk=1)

    def op_types(jit_compile):
        fn = tf.function(lambda s: gradient(s, tasks)[0], jit_compile=jit_compile)
        graph = fn.get_concrete_function(state).graph.as_graph_def()
        body = {node.op for function in graph.library.function for node in function.node_def}
        return {node.op for node in graph.node}, body

    top, body = op_types(True)
    assert top & {"While", "StatelessWhile"}, sorted(top)
    assert "XlaOptimizationBarrier" in body
    assert "XlaOptimizationBarrier" not in set.union(*op_types(False))


@pytest.mark.slow
def test_second_order_patches_compile_to_the_intended_kernels():
    """The patch tensors' second derivatives stay free of XLA in-place updates (dynamic-update-
    slice): concatenated patches made a chain of them per block, one per shifted view, and slowed
    the step (docs/design.md, stacked patches). The gradients of stride-2 patches have no
    zero-interleaved pads (a strided view's gradient, nine of them summed per input value), and
    its kernel gradients are wide products."""
    channels = 8
    init, apply, tasks = tiny_conv4_meta_batch(channels)
    step = tf.function(lambda w: maml.meta_gradients(apply, w, tasks, inner_lr=0.4, inner_steps=1),
                       jit_compile=True)
    hlo = step.experimental_get_compiler_ir(init(0))(stage="optimized_hlo")
    updated = re.findall(r"= f32\[([0-9,]*)\][^=]*? dynamic-update-slice\(", hlo)
    assert updated == [] or all(int(shape.split(",")[-1]) != 9 * channels for shape in updated), updated
    pads = re.findall(r" pad\([^)]*\), padding=([0-9_x-]+)", hlo)
    assert pads, "no pad in the compiled step: the check below would pass vacuously"
    interleaved = [p for p in pads if any(d.count("_") == 2 and d.split("_")[2] != "0"
                                          for d in p.split("x"))]
    assert interleaved == [], interleaved
    # The nine views are stacked as matrices ([rows, 9, C]): XLA compiles a stack of 5-d views
    # and its slices, the bulk of the step's compile time, far slower (docs/design.md, flat stack).
    stacks = [shape.split(",") for shape, operands in
              re.findall(r"= f32\[([0-9,]*)\][^=]*? concatenate\(([^)]*)\)", hlo)
              if operands.count("%") == 9]
    assert stacks and all(len(shape) == 3 for shape in stacks), stacks
    # Every kernel gradient is a wide product [..., N, K] (N output channels, K = 9C patch
    # values), transposed afterwards: XLA on CPU runs the narrow [..., K, N] form of the same
    # product much slower (docs/design.md, wide kernel gradients).
    outputs = [shape.split(",")[-2:] for shape in re.findall(r"= f32\[([0-9,]*)\]\S* dot\(", hlo)]
    k, n = str(9 * channels), str(channels)
    assert [k, n] not in outputs, "a kernel gradient compiled to the narrow [..., K, N] product"
    assert [n, k] in outputs, f"no wide [..., {n}, {k}] product: the check above is vacuous"
