"""Adam written functionally over a weight list, so the update compiles into the same graph.

``state = adam_init(weights)``; ``weights, state = adam_update(grads, weights, state, lr)``. The
state is ``(step, m_list, v_list)``: plain tensors that a checkpoint or a ``tf.Variable`` can hold.
"""

import tensorflow as tf


def adam_init(weights):
    zeros = [tf.zeros_like(w) for w in weights]
    return (tf.zeros([], tf.int64), zeros, [tf.zeros_like(w) for w in weights])


def clip_by_global_norm(grads, max_norm):
    """Scale ``grads`` so their global norm is at most ``max_norm`` (``None`` leaves them)."""
    if max_norm is None:
        return grads
    clipped, _ = tf.clip_by_global_norm(grads, max_norm)
    return clipped


def adam_update(grads, weights, state, lr, beta1=0.9, beta2=0.999, epsilon=1e-8):
    """One Adam step (Kingma & Ba, Algorithm 1, bias-corrected); returns (weights, state)."""
    step, m, v = state
    step = step + 1
    t = tf.cast(step, weights[0].dtype)
    scale = lr * tf.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
    m = [beta1 * mi + (1.0 - beta1) * g for mi, g in zip(m, grads)]
    v = [beta2 * vi + (1.0 - beta2) * tf.square(g) for vi, g in zip(v, grads)]
    weights = [w - scale * mi / (tf.sqrt(vi) + epsilon) for w, mi, vi in zip(weights, m, v)]
    return weights, (step, m, v)
