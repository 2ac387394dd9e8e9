"""Implicit MAML (Rajeswaran, Finn, Kakade & Levine 2019): the meta-gradient through the solution
of a proximal inner problem, with memory independent of the number of inner steps.

Each task ``i`` adapts by solving ``min_w L_i(w) + lam/2 |w - theta|^2`` (``L_i`` its support
loss) approximately, with ``inner_steps`` gradient steps from ``theta`` in a ``tf.while_loop``
that keeps nothing for a backward pass. At the solution ``w_i``, ``dw_i/dtheta = (I + H_i/lam)^-1``
(``H_i`` the support-loss Hessian at ``w_i``), so the meta-gradient of the mean query loss is
``mean_i (I + H_i/lam)^-1 grad Lq_i(w_i)``; the linear systems are solved by ``cg_steps``
conjugate-gradient iterations on Hessian-vector products, for all tasks at once (each task with
its own CG scalars). As in ``maml``, the whole training step is one compiled function.

Example::

    init, apply = nets.conv4(n_way=5)
    loss, grads = imaml.meta_gradients(apply, init(0), tasks, inner_lr=0.1, inner_steps=10,
                                       lam=2.0, cg_steps=5)
"""

import tensorflow as tf

from functional_meta import maml, second_order


def check_options(inner_steps, lam, cg_steps):
    """Raises ``ValueError`` naming ``inner_steps``, ``lam`` or ``cg_steps`` if out of range."""
    for name, value in (("inner_steps", inner_steps), ("cg_steps", cg_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam > 0:
        raise ValueError(f"lam (the proximal regularisation) must be a positive number, "
                         f"got {lam!r}")


def proximal_adapt(apply_fn, weights, x, y, *, inner_lr, inner_steps, lam,
                   loss="cross_entropy"):
    """``inner_steps`` gradient steps on every task's ``L_i(w) + lam/2 |w - theta|^2`` from
    ``w = theta`` (``weights``): per-task weights ``[T, *shape]``, not differentiable (the
    meta-gradient is implicit)."""
    loss_fn = maml.loss_function(loss)
    theta = maml.per_task([tf.stop_gradient(w) for w in weights], x.shape[0])

    def body(i, ws):
        grads = maml.support_gradient(apply_fn, ws, x, y, loss_fn)
        return i + 1, [w - inner_lr * (g + lam * (w - t)) for w, g, t in zip(ws, grads, theta)]

    _, adapted = tf.while_loop(lambda i, _: i < inner_steps, body, (0, theta),
                               maximum_iterations=inner_steps)
    return [tf.stop_gradient(w) for w in adapted]


def _task_dot(a, b):
    """Per-task inner products of two per-task weight lists: ``[T]``."""
    return tf.add_n([tf.reduce_sum(tf.reshape(u * v, [u.shape[0], -1]), axis=1)
                     for u, v in zip(a, b)])


def _per_task_scale(scalars, tensors):
    return [tf.reshape(scalars, [-1] + [1] * (t.shape.rank - 1)) * t for t in tensors]


def conjugate_gradient(matvec, b, steps):
    """``steps`` conjugate-gradient iterations for ``A x = b`` from ``x = 0``, per task (the first
    axis of every tensor of the list ``b``); ``matvec`` applies the symmetric ``A`` to such a
    list. A task whose residual reaches zero stays where it is."""
    x = [tf.zeros_like(t) for t in b]
    rr = _task_dot(b, b)

    def body(i, x, r, p, rr):
        ap = matvec(p)
        alpha = tf.math.divide_no_nan(rr, _task_dot(p, ap))
        x = [u + v for u, v in zip(x, _per_task_scale(alpha, p))]
        r = [u - v for u, v in zip(r, _per_task_scale(alpha, ap))]
        new = _task_dot(r, r)
        p = [u + v for u, v in zip(r, _per_task_scale(tf.math.divide_no_nan(new, rr), p))]
        return i + 1, x, r, p, new

    _, x, _, _, _ = tf.while_loop(lambda i, *_: i < steps, body, (0, x, list(b), list(b), rr),
                                  maximum_iterations=steps)
    return x


def meta_gradients(apply_fn, weights, tasks, *, inner_lr, inner_steps, lam, cg_steps,
                   loss="cross_entropy"):
    """The mean query loss after proximal adaptation and its implicit meta-gradient with respect
    to ``weights``: ``(loss, grads, query_outputs)``."""
    check_options(inner_steps, lam, cg_steps)
    support_x, support_y, query_x, query_y = tasks
    loss_fn = maml.loss_function(loss)
    adapted = proximal_adapt(apply_fn, weights, support_x, support_y, inner_lr=inner_lr,
                             inner_steps=inner_steps, lam=lam, loss=loss_fn)
    with tf.GradientTape() as tape:
        tape.watch(adapted)
        outputs = apply_fn(adapted, query_x)
        value = tf.reduce_mean(loss_fn(outputs, query_y))
    query_grads = tape.gradient(value, adapted)

    def matvec(v):     # (I + H/lam) v, every task's own Hessian (block diagonal over tasks)
        hv = second_order.support_hvp(apply_fn, adapted, support_x, support_y, v, loss_fn)
        return [u + h / lam for u, h in zip(v, hv)]

    solution = conjugate_gradient(matvec, query_grads, cg_steps)
    return value, [tf.reduce_sum(s, axis=0) for s in solution], outputs


def unrolled_meta_gradients(apply_fn, weights, tasks, *, inner_lr, inner_steps, lam,
                            loss="cross_entropy"):
    """The exact gradient of the same objective through the ``inner_steps`` proximal steps,
    unrolled (TensorFlow differentiates every step): what ``meta_gradients`` approximates, and
    equals once the inner problem is solved and CG has converged. ``(loss, grads)``."""
    support_x, support_y, query_x, query_y = tasks
    loss_fn = maml.loss_function(loss)
    with tf.GradientTape() as tape:
        tape.watch(weights)
        theta = maml.per_task(weights, support_x.shape[0])
        ws = theta
        for _ in range(inner_steps):
            grads = maml.support_gradient(apply_fn, ws, support_x, support_y, loss_fn)
            ws = [w - inner_lr * (g + lam * (w - t)) for w, g, t in zip(ws, grads, theta)]
        value = tf.reduce_mean(loss_fn(apply_fn(ws, query_x), query_y))
    return value, tape.gradient(value, weights)


def train_step_parts(apply_fn, *, inner_steps, lam, cg_steps, outer_lr=1e-3,
                     loss="cross_entropy", clip_norm=None, task_chunk=None):
    """``(params, gradient, update)`` as ``maml.train_step_parts``, with the implicit
    meta-gradient; the state is ``maml.init_state``'s with a fixed inner rate."""
    check_options(inner_steps, lam, cg_steps)
    params, _, update = maml.train_step_parts(apply_fn, inner_steps=inner_steps,
                                              outer_lr=outer_lr, loss=loss, clip_norm=clip_norm,
                                              task_chunk=task_chunk)

    def chunk_gradient(state, tasks):
        if isinstance(state["inner_lr"], (list, tuple)):
            raise ValueError("iMAML adapts with a fixed inner rate (lr_mode='fixed')")
        value, grads, outputs = meta_gradients(
            apply_fn, state["weights"], tasks, inner_lr=state["inner_lr"],
            inner_steps=inner_steps, lam=lam, cg_steps=cg_steps, loss=loss)
        metrics = {"loss": value}
        if loss == "cross_entropy":
            metrics["accuracy"] = maml.accuracy(outputs, tasks[3], value.dtype)
        return grads, metrics

    def gradient(state, tasks):
        names = ["loss", "accuracy"] if loss == "cross_entropy" else ["loss"]
        return maml.chunked_gradient(chunk_gradient, state, tasks, task_chunk, params(state),
                                     names)

    return params, gradient, update


def make_train_step(apply_fn, *, jit_compile=True, **options):
    """The whole iMAML training step as one compiled function: ``step(state, tasks) -> (state,
    metrics)``; ``options`` are those of ``train_step_parts``."""
    _, gradient, update = train_step_parts(apply_fn, **options)
    return maml.compile_step(gradient, update, jit_compile)


def make_eval_step(apply_fn, *, inner_steps, lam, loss="cross_entropy", jit_compile=True):
    """``evaluate(weights, inner_lr, tasks) -> (per-task query loss, per-task accuracy)`` after the
    proximal adaptation (as ``maml.make_eval_step``; for regression the loss twice)."""
    loss_fn = maml.loss_function(loss)

    @tf.function(jit_compile=jit_compile, autograph=False)
    def evaluate(weights, inner_lr, tasks):
        support_x, support_y, query_x, query_y = tasks
        adapted = proximal_adapt(apply_fn, weights, support_x, support_y, inner_lr=inner_lr,
                                 inner_steps=inner_steps, lam=lam, loss=loss_fn)
        outputs = apply_fn(adapted, query_x)
        return maml.score_queries(outputs, query_y, loss)

    return evaluate

