import numpy as np
import pytest
import tensorflow as tf

from functional_meta import maml, nets

F64 = tf.float64


def regression_tasks(rng, t=3, n=6, q=5, d=3):
    return tuple(tf.constant(a) for a in (
        rng.normal(size=(t, n, d)), rng.normal(size=(t, n, 1)),
        rng.normal(size=(t, q, d)), rng.normal(size=(t, q, 1))))


def image_tasks(rng, t=2, way=3, shot=2, shape=(8, 8, 1)):
    sx = rng.normal(size=(t, way * shot) + shape)
    qx = rng.normal(size=(t, way * shot) + shape)
    y = np.tile(np.repeat(np.arange(way), shot), (t, 1)).astype(np.int32)
    return tf.constant(sx), tf.constant(y), tf.constant(qx), tf.constant(y[:, ::-1].copy())


def closed_form_meta_gradient(theta, tasks, alpha, k):
    """Linear least squares: the inner map is affine, so the k-step meta-gradient is exact."""
    sx, sy, qx, qy = (np.asarray(a) for a in tasks)
    total = np.zeros_like(theta)
    for s_x, s_y, q_x, q_y in zip(sx, sy, qx, qy):
        xs = np.hstack([s_x, np.ones((len(s_x), 1))])
        xq = np.hstack([q_x, np.ones((len(q_x), 1))])
        h = 2.0 / len(xs) * xs.T @ xs
        jac = np.eye(len(theta)) - alpha * h
        th = theta.copy()
        for _ in range(k):
            th = th - alpha * 2.0 / len(xs) * xs.T @ (xs @ th - s_y)
        grad_q = 2.0 / len(xq) * xq.T @ (xq @ th - q_y)
        total += np.linalg.matrix_power(jac, k).T @ grad_q
    return total / len(sx)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_linear_regression_matches_closed_form(k):
    rng = np.random.default_rng(k)
    tasks = regression_tasks(rng)
    init, apply = nets.mlp([3, 1])
    weights = [tf.constant(rng.normal(size=(3, 1))), tf.constant(rng.normal(size=(1,)))]
    _, grads = maml.meta_gradients(apply, weights, tasks, inner_lr=0.1, inner_steps=k, loss="mse")
    theta = np.concatenate([weights[0].numpy(), weights[1].numpy()[:, None]])
    want = closed_form_meta_gradient(theta, tasks, 0.1, k)
    got = np.concatenate([grads[0].numpy(), grads[1].numpy()[:, None]])
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def directional_check(f, grads, weights, rng, directions=3, eps=1e-6):
    """Central differences along random directions. ReLU kinks make the loss piecewise smooth: a
    direction whose segment crosses one (the estimates at eps and eps/10 disagree) is redrawn."""
    checked = 0
    for _ in range(5 * directions):
        v = [tf.constant(rng.normal(size=w.shape)) for w in weights]
        estimates = [(f([w + e * d for w, d in zip(weights, v)])
                      - f([w - e * d for w, d in zip(weights, v)])) / (2 * e) for e in (eps, eps / 10)]
        analytic = sum(float(tf.reduce_sum(g * d)) for g, d in zip(grads, v))
        scale = max(abs(analytic), 1e-3)
        if abs(estimates[0] - estimates[1]) > 1e-6 * scale:
            continue
        assert abs(estimates[0] - analytic) <= 1e-6 * scale, (estimates, analytic)
        checked += 1
        if checked == directions:
            return
    raise AssertionError("too few smooth directions to check")


NETS = {
    "mlp": (lambda: nets.mlp([8 * 8, 6, 3], activation=tf.tanh, in_shape=(8, 8, 1))),
    # Four channels: the first block runs from patch statistics, the second as patches times
    # per-task kernels (at the first inner step, in a graph, as one product with the shared kernel).
    "conv4": (lambda: nets.conv4(n_way=3, channels=4, in_shape=(8, 8, 1), blocks=2)),
}


@pytest.mark.parametrize("net", [pytest.param(n, marks=pytest.mark.slow) if n == "conv4" else n
                                 for n in sorted(NETS)])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("traced", [False, True])
def test_second_order_meta_gradient_matches_finite_differences(net, steps, traced):
    # Traced (tf.function) the products with the first step's shared weights run as single ones
    # with their own gradient (nets._task_matmul); eagerly as tf.matmul. Both are checked here.
    rng = np.random.default_rng(steps)
    init, apply = NETS[net]()
    weights = init(0, F64)
    tasks = image_tasks(rng)
    kw = dict(inner_lr=0.3, inner_steps=steps)
    fn = lambda w: maml.meta_gradients(apply, w, tasks, **kw)
    _, grads = (tf.function(fn) if traced else fn)(weights)
    directional_check(lambda w: float(maml.meta_loss(apply, w, tasks, **kw)[0]), grads, weights, rng)


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("steps", [1, 3])
def test_first_order_meta_gradient_matches_its_definition(net, steps):
    # FOMAML's gradient is the query-loss gradient at the adapted weights, treated as constants.
    rng = np.random.default_rng(10 + steps)
    init, apply = NETS[net]()
    weights = init(1, F64)
    tasks = image_tasks(rng)
    _, grads = maml.meta_gradients(apply, weights, tasks, inner_lr=0.3, inner_steps=steps,
                                   first_order=True)
    adapted = maml.adapt(apply, weights, tasks[0], tasks[1], 0.3, steps)

    def query_loss_at_adapted_plus(w):
        # Moving every task's adapted weights by the same (w - weights): the FOMAML objective.
        shifted = [a + (x - w0) for a, x, w0 in zip(adapted, w, weights)]
        return float(tf.reduce_mean(maml.cross_entropy(apply(shifted, tasks[2]), tasks[3])))

    directional_check(query_loss_at_adapted_plus, grads, weights, rng)


@pytest.mark.slow
@pytest.mark.parametrize("first_order", [False, True])
def test_products_with_shared_first_step_weights_change_no_digit(monkeypatch, first_order):
    # In a graph, the first inner step's products with a broadcast of the shared weights run as one
    # product with the shared tensor and their own gradient; eagerly, as one product per task.
    # Float64: the meta-gradients must agree to rounding, and the graph must have taken that path.
    tied = []
    source = nets._broadcast_source

    def spy(weight):
        found = source(weight)
        tied.append(found is not None)
        return found

    monkeypatch.setattr(nets, "_broadcast_source", spy)
    init, apply = nets.conv4(n_way=3, channels=5, in_shape=(10, 10, 1), blocks=3)
    weights, tasks = init(2, F64), image_tasks(np.random.default_rng(6), t=3, shape=(10, 10, 1))
    fn = lambda w: maml.meta_gradients(apply, w, tasks, inner_lr=0.3, inner_steps=2,
                                       first_order=first_order)
    eager_loss, eager = fn(weights)
    assert not any(tied)
    graph_loss, graph = tf.function(fn)(weights)
    assert sum(tied) == 3  # blocks 2 and 3 and the head, at the first of the two inner steps
    np.testing.assert_allclose(graph_loss.numpy(), eager_loss.numpy(), rtol=1e-13)
    for a, b in zip(graph, eager):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-14)


def test_first_and_second_order_differ_on_nonlinear_net():
    rng = np.random.default_rng(0)
    init, apply = NETS["conv4"]()
    weights, tasks = init(0, F64), image_tasks(rng)
    _, exact = maml.meta_gradients(apply, weights, tasks, inner_lr=0.3, inner_steps=1)
    _, first = maml.meta_gradients(apply, weights, tasks, inner_lr=0.3, inner_steps=1,
                                   first_order=True)
    diff = np.sqrt(sum(float(tf.reduce_sum((a - b) ** 2)) for a, b in zip(exact, first)))
    norm = np.sqrt(sum(float(tf.reduce_sum(a ** 2)) for a in exact))
    assert diff > 1e-3 * norm


def test_first_and_second_order_agree_when_hessian_is_zero():
    # Linear model and a loss linear in its output: the support Hessian vanishes.
    rng = np.random.default_rng(1)
    tasks = regression_tasks(rng)
    _, apply = nets.mlp([3, 1])
    weights = [tf.constant(rng.normal(size=(3, 1))), tf.constant(rng.normal(size=(1,)))]
    linear = lambda out, y: tf.reduce_mean(out * y, axis=[-2, -1])
    _, exact = maml.meta_gradients(apply, weights, tasks, inner_lr=0.5, inner_steps=3, loss=linear)
    _, first = maml.meta_gradients(apply, weights, tasks, inner_lr=0.5, inner_steps=3, loss=linear,
                                   first_order=True)
    for a, b in zip(exact, first):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-14)


def small_classifier():
    return nets.conv4(n_way=3, channels=8, in_shape=(10, 10, 1), blocks=2)


def small_tasks(seed=0, t=4, dtype=tf.float32):
    return tuple(tf.cast(a, dtype) if a.dtype == F64 else a
                 for a in image_tasks(np.random.default_rng(seed), t=t, shape=(10, 10, 1)))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [tf.float32, F64])
def test_xla_and_plain_meta_gradients_agree(dtype):
    """In float64 the compiled meta-gradient equals the eager one to rounding: this checks the
    forms only XLA traces take (nets._kernel_gradient's barrier and wide products, the shared
    first-step products) against plain TensorFlow. Float32 gets a loose tolerance: where an
    activation lies within rounding of zero, the two computations can put it on different sides
    of ReLU's kink, and each such flip moves a gradient entry by a whole term."""
    init, apply = small_classifier()
    weights = init(0, dtype)
    tasks = small_tasks(dtype=dtype)
    fn = lambda w, t: maml.meta_gradients(apply, w, t, inner_lr=0.4, inner_steps=2)
    plain_loss, plain = fn(weights, tasks)
    xla_loss, xla = tf.function(fn, jit_compile=True)(weights, tasks)
    exact = dtype == F64
    np.testing.assert_allclose(xla_loss.numpy(), plain_loss.numpy(), rtol=1e-13 if exact else 1e-5)
    for a, b in zip(xla, plain):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10 if exact else 2e-3,
                                   atol=1e-13 if exact else 2e-5)


@pytest.mark.slow
def test_recompute_gives_the_same_meta_gradient():
    init, apply = NETS["mlp"]()
    weights, tasks = init(0, F64), image_tasks(np.random.default_rng(3))
    kw = dict(inner_lr=0.3, inner_steps=3)
    _, stored = maml.meta_gradients(apply, weights, tasks, **kw)
    _, recomputed = tf.function(lambda w: maml.meta_gradients(apply, w, tasks, recompute=True, **kw),
                                jit_compile=True)(weights)
    for a, b in zip(stored, recomputed):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_train_step_compiles_once_and_learns():
    init, apply = small_classifier()
    step = maml.make_train_step(apply, inner_steps=1, outer_lr=3e-3)
    state = maml.init_state(init(0), inner_lr=0.4)
    losses = []
    for i in range(12):
        state, metrics = step(state, small_tasks(seed=i % 2))
        losses.append(float(metrics["loss"]))
    assert step.experimental_get_tracing_count() == 1
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0


@pytest.mark.parametrize("net, jit", [("mlp", False),
                                      pytest.param("conv4", True, marks=pytest.mark.slow)])
def test_task_chunks_give_the_same_step(net, jit):
    # Float64, so that the chunked sum of gradients must equal the whole batch's to rounding; the
    # compiled conv4 case runs the chunk loop under XLA with per-task batch norm.
    init, apply = NETS[net]()
    tasks = image_tasks(np.random.default_rng(4), t=4)
    state = maml.init_state(init(0, F64), inner_lr=0.3, lr_mode="lslr", inner_steps=2)
    results = []
    # Under XLA each chunk size is a compile of its own: the whole batch and chunks of 2 only.
    for chunk in (None, 2) if jit else (None, 1, 2, 4):
        step = maml.make_train_step(apply, inner_steps=2, outer_lr=1e-2, task_chunk=chunk,
                                    jit_compile=jit)
        results.append(step(state, tasks))
    for new, metrics in results[1:]:
        np.testing.assert_allclose(metrics["loss"], results[0][1]["loss"], rtol=1e-12)
        np.testing.assert_allclose(metrics["accuracy"], results[0][1]["accuracy"], rtol=1e-12)
        for a, b in zip(tf.nest.flatten(new), tf.nest.flatten(results[0][0])):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    assert not np.allclose(results[0][0]["weights"][0], state["weights"][0])   # it did update
    # The learned inner rates (LSLR) moved too: their gradients were summed over the chunks.
    assert not np.allclose(results[0][0]["inner_lr"][0][0], state["inner_lr"][0][0])
    with pytest.raises(ValueError, match="task_chunk=3 must divide the meta-batch"):
        maml.make_train_step(apply, inner_steps=1, task_chunk=3, jit_compile=False)(state, tasks)
    with pytest.raises(ValueError, match="task_chunk must be a positive int"):
        maml.make_train_step(apply, inner_steps=1, task_chunk=0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["metasgd", "lslr"])
def test_learned_inner_learning_rates_receive_gradients(mode):
    init, apply = small_classifier()
    state = maml.init_state(init(0), inner_lr=0.4, lr_mode=mode, inner_steps=2)
    before = [v.numpy() for v in tf.nest.flatten(state["inner_lr"])]
    step = maml.make_train_step(apply, inner_steps=2, outer_lr=1e-2)
    state, _ = step(state, small_tasks())
    after = [v.numpy() for v in tf.nest.flatten(state["inner_lr"])]
    assert len(after) == len(init(0)) * (2 if mode == "lslr" else 1)
    changed = [not np.allclose(a, b) for a, b in zip(after, before)]
    assert sum(changed) >= len(changed) - 1  # every rate moves (Adam: sign-sized steps)
    if mode == "metasgd":
        assert after[0].shape == init(0)[0].shape


def test_lslr_uses_each_steps_rate():
    init, apply = NETS["conv4"]()
    weights, tasks = init(0, F64), image_tasks(np.random.default_rng(4))
    n = len(weights)
    per_step = [[tf.constant(0.3, F64)] * n, [tf.constant(0.1, F64)] * n]
    a = maml.adapt(apply, weights, tasks[0], tasks[1], per_step, 2)
    one = maml.adapt(apply, weights, tasks[0], tasks[1], 0.3, 1)
    b = maml.adapt(apply, [w[0] for w in one], tasks[0][:1], tasks[1][:1], 0.1, 1)
    np.testing.assert_allclose(a[0][0].numpy(), b[0][0].numpy(), rtol=1e-12)


def test_multi_step_loss_weights():
    init, apply = NETS["mlp"]()
    weights, tasks = init(0, F64), image_tasks(np.random.default_rng(5))
    kw = dict(inner_lr=0.3, inner_steps=3)
    last, _ = maml.meta_loss(apply, weights, tasks, **kw)
    explicit, _ = maml.meta_loss(apply, weights, tasks, step_weights=[0, 0, 1], **kw)
    np.testing.assert_allclose(explicit.numpy(), last.numpy())
    losses = [maml.meta_loss(apply, weights, tasks, inner_lr=0.3, inner_steps=s)[0].numpy()
              for s in (1, 2, 3)]
    mixed, _ = maml.meta_loss(apply, weights, tasks, step_weights=[0.2, 0.3, 0.5], **kw)
    np.testing.assert_allclose(mixed.numpy(), 0.2 * losses[0] + 0.3 * losses[1] + 0.5 * losses[2])
    with pytest.raises(ValueError, match="step_weights"):
        maml.meta_loss(apply, weights, tasks, step_weights=[1.0], **kw)


def test_eval_step_adapts_for_more_steps_at_test_time():
    init, apply = small_classifier()
    weights, tasks = init(0), small_tasks()
    one = maml.make_eval_step(apply, inner_steps=1, jit_compile=False)(weights, tf.constant(0.4), tasks)
    five = maml.make_eval_step(apply, inner_steps=5, jit_compile=False)(weights, tf.constant(0.4), tasks)
    support_tasks = (tasks[0], tasks[1], tasks[0], tasks[1])
    fit1 = maml.make_eval_step(apply, inner_steps=1, jit_compile=False)(weights, tf.constant(0.4), support_tasks)
    fit5 = maml.make_eval_step(apply, inner_steps=5, jit_compile=False)(weights, tf.constant(0.4), support_tasks)
    assert one[0].shape == (4,) and five[1].shape == (4,)
    assert float(tf.reduce_mean(fit5[0])) < float(tf.reduce_mean(fit1[0]))  # more steps fit more
