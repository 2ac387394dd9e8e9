"""Adam and RMSProp written functionally over a weight list, so the update compiles into the same
graph.

``state = adam_init(weights)``; ``weights, state = adam_update(grads, weights, state, lr)``. The
state is ``(step, m_list, v_list)``: plain tensors that a checkpoint or a ``tf.Variable`` can hold.
``rmsprop_init`` and ``rmsprop_update`` work alike, with the state ``(step, ms_list, mom_list)``.
``lr`` is a number or a schedule ``lr(step)`` of the update's 1-based step count, e.g.
``step_decay(1e-3, 2000, 0.5)``: the rate is computed inside the compiled step from the count the
state already holds, so a schedule needs no retrace and a restored state continues it exactly.
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


def step_decay(lr, every, factor):
    """The schedule ``lr * factor ** ((step - 1) // every)``: updates ``1..every`` use ``lr``, the
    next ``every`` updates ``lr * factor``, and so on (ProtoNet's Adam 1e-3 halved every 2000
    episodes is ``step_decay(1e-3, 2000, 0.5)``). ``step`` is an integer tensor, the count after
    the update, as ``adam_update`` passes it."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise ValueError(f"factor must be in (0, 1], got {factor!r}")

    def schedule(step):
        decays = (tf.cast(step, tf.int64) - 1) // every
        return lr * tf.pow(tf.constant(factor, tf.float64), tf.cast(decays, tf.float64))

    return schedule


def adam_update(grads, weights, state, lr, beta1=0.9, beta2=0.999, epsilon=1e-8):
    """One Adam step (Kingma & Ba, Algorithm 1, bias-corrected); returns (weights, state).
    ``lr``: a number, or a schedule called with the new step count (see ``step_decay``)."""
    step, m, v = state
    step = step + 1
    t = tf.cast(step, weights[0].dtype)
    if callable(lr):
        lr = tf.cast(lr(step), weights[0].dtype)
    scale = lr * tf.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
    m = [beta1 * mi + (1.0 - beta1) * g for mi, g in zip(m, grads)]
    v = [beta2 * vi + (1.0 - beta2) * tf.square(g) for vi, g in zip(v, grads)]
    weights = [w - scale * mi / (tf.sqrt(vi) + epsilon) for w, mi, vi in zip(weights, m, v)]
    return weights, (step, m, v)


def rmsprop_init(weights):
    """RMSProp's state ``(step, mean squares, momenta)``, all zero."""
    return (tf.zeros([], tf.int64), [tf.zeros_like(w) for w in weights],
            [tf.zeros_like(w) for w in weights])


def rmsprop_update(grads, weights, state, lr, decay=0.95, momentum=0.9, epsilon=1e-10):
    """One RMSProp step with momentum (Tieleman & Hinton 2012; the form of TensorFlow's
    ``RMSPropOptimizer``): ``ms = decay ms + (1 - decay) g^2``, ``mom = momentum mom +
    lr g / sqrt(ms + epsilon)``, ``w = w - mom``. The defaults are the memory-augmented network's
    (Santoro et al. 2016: decay 0.95, momentum 0.9). ``lr`` as in ``adam_update``."""
    step, ms, mom = state
    step = step + 1
    if callable(lr):
        lr = tf.cast(lr(step), weights[0].dtype)
    ms = [decay * s + (1.0 - decay) * tf.square(g) for s, g in zip(ms, grads)]
    mom = [momentum * p + lr * g / tf.sqrt(s + epsilon) for p, g, s in zip(mom, grads, ms)]
    return [w - p for w, p in zip(weights, mom)], (step, ms, mom)


OPTIMIZERS = {"adam": (adam_init, adam_update), "rmsprop": (rmsprop_init, rmsprop_update)}


def decoupled_weight_decay(update, weight_decay, decays):
    """``update`` (an ``OPTIMIZERS`` update) followed by decoupled weight decay (Loshchilov &
    Hutter 2019, AdamW): each weight ``w`` (the ``i``-th) with ``decays(i, w)`` true also moves by
    ``-lr * weight_decay * w`` of its value before the step, ``lr`` the step's rate (a schedule
    is called with the new step count, as the update calls it). Unlike an L2 term in the loss,
    the decay is not rescaled by Adam's or RMSProp's per-weight normalisation."""
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) \
            or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")

    def decayed_update(grads, weights, state, lr):
        new_weights, new_state = update(grads, weights, state, lr)
        rate = tf.cast(lr(new_state[0]), weights[0].dtype) if callable(lr) \
            else tf.convert_to_tensor(lr, weights[0].dtype)
        return [n - rate * weight_decay * w if decays(i, w) else n
                for i, (n, w) in enumerate(zip(new_weights, weights))], new_state

    return decayed_update


def conjugate_gradient(matvec, b, iterations=10, residual_tol=1e-10):
    """Approximately solves ``A x = b`` for a symmetric positive-definite ``A`` given only
    ``matvec(v) = A v`` (vectors), by at most ``iterations`` conjugate-gradient steps from
    ``x = 0``, stopping once the squared residual is below ``residual_tol`` (TRPO's natural
    gradient, Schulman et al. 2015, Appendix C). A ``tf.while_loop``: it compiles into the step."""
    def body(i, x, r, p, rr):
        ap = matvec(p)
        alpha = rr / tf.reduce_sum(p * ap)
        x, r = x + alpha * p, r - alpha * ap
        new_rr = tf.reduce_sum(r * r)
        return i + 1, x, r, r + (new_rr / rr) * p, new_rr

    start = (tf.constant(0), tf.zeros_like(b), b, b, tf.reduce_sum(b * b))
    _, x, _, _, _ = tf.while_loop(lambda i, x, r, p, rr: tf.logical_and(i < iterations,
                                                                          rr >= residual_tol),
                                  body, start, maximum_iterations=iterations)
    return x
