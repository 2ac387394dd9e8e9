"""Tools to study MAML's second-order term.

The exact meta-gradient is the first-order (FOMAML) gradient plus a correction that flows through
the inner gradient, i.e. through Hessian-vector products of the support loss. ``split`` measures
that correction per weight tensor; ``support_hvp`` gives the Hessian-vector product itself.
"""

import tensorflow as tf

from functional_meta import maml


def _norm(tensors):
    return tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(t)) for t in tensors]))


def _cosine(a, b):
    dot = tf.add_n([tf.reduce_sum(x * y) for x, y in zip(a, b)])
    return dot / tf.maximum(_norm(a) * _norm(b), tf.constant(1e-30, dot.dtype))


def split(apply_fn, weights, tasks, **kwargs):
    """The exact meta-gradient split into its first-order part and the second-order correction.

    ``kwargs`` are those of ``maml.meta_gradients`` (``inner_lr``, ``inner_steps``, ...). Returns a
    dict: ``exact``, ``first_order`` and ``correction`` (gradient lists, ``exact = first_order +
    correction``), and per weight tensor and overall: ``norm_exact``, ``norm_first_order``,
    ``norm_correction``, ``cosine`` (between first-order and exact gradients), as lists of scalars
    (per tensor) and ``*_total`` scalars.
    """
    kwargs.pop("first_order", None)
    _, exact = maml.meta_gradients(apply_fn, weights, tasks, first_order=False, **kwargs)
    _, first = maml.meta_gradients(apply_fn, weights, tasks, first_order=True, **kwargs)
    correction = [e - f for e, f in zip(exact, first)]
    out = {"exact": exact, "first_order": first, "correction": correction}
    for name, grads in (("exact", exact), ("first_order", first), ("correction", correction)):
        out[f"norm_{name}"] = [_norm([g]) for g in grads]
        out[f"norm_{name}_total"] = _norm(grads)
    out["cosine"] = [_cosine([f], [e]) for f, e in zip(first, exact)]
    out["cosine_total"] = _cosine(first, exact)
    return out


def support_hvp(apply_fn, weights, x, y, vector, loss="cross_entropy"):
    """Hessian of the support loss (summed over tasks of the per-task mean) times ``vector``.

    ``x``/``y`` carry a task axis; ``weights`` and ``vector`` are lists shaped like the weights
    (shared or per task). Reverse-over-reverse: the gradient of ``<grad L, vector>``.
    """
    loss_fn = maml.loss_function(loss)
    with tf.GradientTape() as outer:
        outer.watch(weights)
        with tf.GradientTape() as inner:
            inner.watch(weights)
            total = tf.reduce_sum(loss_fn(apply_fn(weights, x), y))
        grads = inner.gradient(total, weights)
        dot = tf.add_n([tf.reduce_sum(g * v) for g, v in zip(grads, vector)])
    return outer.gradient(dot, weights)
