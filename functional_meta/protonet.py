"""Prototypical Networks (Snell, Swersky & Zemel, 2017) over a pure embedding ``(init, apply)``.

A class is represented by the mean embedding of its support examples (its prototype); a query is
classified by a softmax over negative distances to the prototypes. The embedding has no head, so
the same weights serve any number of ways: ``n_way`` belongs to each function, not to the model.

Episodes come as a meta-batch ``(support_x, support_y, query_x, query_y)``: ``support_x`` is
``[B, N*K, *in_shape]``, ``support_y`` ``[B, N*K]`` integers in ``0..N-1``, and likewise ``query_x``
``[B, N*Q, *in_shape]``, ``query_y`` ``[B, N*Q]``. Support and query images of an episode are
embedded in one call of ``apply``, so batch normalisation uses the statistics of the whole episode
(support and query together), never those of another episode; with ``bn='support'`` it uses the
support set's alone (``nets.support_rows``), so each query is classified independently of the
others.

Typical use::

    init, apply = nets.conv4(None, channels=64, in_shape=(28, 28, 1), pool="max")
    state = protonet.init_state(init(0))
    step = protonet.make_train_step(apply, n_way=20)
    state, metrics = step(state, episodes)             # metrics: loss, accuracy
    mean_acc, ci95 = protonet.evaluate(apply, state["weights"], sample_fn, 600, n_way=5)
"""

import numpy as np
import tensorflow as tf

from functional_meta import choices, metrics, nets, optim

METRICS = choices.METRICS

# Norms below this are treated as this value when normalising for the cosine distance, so a zero
# embedding has distance 1 to everything and a finite (zero) gradient.
COSINE_EPSILON = 1e-8


def _check_metric(metric):
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def _check_n_way(n_way):
    if isinstance(n_way, bool) or not isinstance(n_way, (int, np.integer)) or n_way < 1:
        raise ValueError(f"n_way must be a positive int, got {n_way!r}")
    return int(n_way)


def prototypes(embeddings, labels, n_way):
    """Class means ``[B, N, D]`` of ``embeddings [B, S, D]`` grouped by ``labels [B, S]``.

    One batched matrix product, ``one_hot(labels)^T @ embeddings``, divided by the class counts.
    A class without support examples gets a zero prototype (``validate_episode`` rejects that
    before training or evaluation starts).
    """
    embeddings = tf.convert_to_tensor(embeddings)
    one_hot = tf.one_hot(labels, n_way, dtype=embeddings.dtype)         # [B, S, N]
    sums = tf.matmul(one_hot, embeddings, transpose_a=True)             # [B, N, D]
    counts = tf.reduce_sum(one_hot, axis=1)                             # [B, N]
    return sums / tf.maximum(counts, 1.0)[:, :, None]


def _unit(x):
    """``x / max(|x|, COSINE_EPSILON)`` along the last axis, with no sqrt of zero."""
    sum_sq = tf.reduce_sum(tf.square(x), axis=-1, keepdims=True)
    return x * tf.math.rsqrt(tf.maximum(sum_sq, COSINE_EPSILON ** 2))


def distances(queries, protos, metric="euclidean"):
    """Distances ``[B, M, N]`` from ``queries [B, M, D]`` to ``protos [B, N, D]``.

    ``'euclidean'``: squared Euclidean distance ``|q|^2 - 2 q.p + |p|^2`` with one batched matrix
    product, clamped at zero. Both sides are first shifted by the (constant) mean prototype of their
    episode; the distance is unchanged but the cancellation error shrinks when all embeddings share
    a large offset (ReLU features do). No square root, so the gradient is finite at ``q == p``.

    ``'cosine'``: ``1 - cos(q, p)`` in ``[0, 2]``; a zero vector has distance 1 to everything.
    """
    _check_metric(metric)
    queries = tf.convert_to_tensor(queries)
    protos = tf.convert_to_tensor(protos, dtype=queries.dtype)
    if queries.shape.rank != 3 or protos.shape.rank != 3:
        raise ValueError(f"distances expects queries [B, M, D] and protos [B, N, D], got "
                         f"{queries.shape} and {protos.shape}")
    if queries.shape[-1] is not None and protos.shape[-1] is not None \
            and queries.shape[-1] != protos.shape[-1]:
        raise ValueError(f"queries have {queries.shape[-1]} features, protos {protos.shape[-1]}")
    if metric == "cosine":
        cos = tf.matmul(_unit(queries), _unit(protos), transpose_b=True)
        return tf.clip_by_value(1.0 - cos, 0.0, 2.0)
    center = tf.stop_gradient(tf.reduce_mean(protos, axis=1, keepdims=True))
    q, p = queries - center, protos - center
    q_sq = tf.reduce_sum(tf.square(q), axis=-1)[:, :, None]              # [B, M, 1]
    p_sq = tf.reduce_sum(tf.square(p), axis=-1)[:, None, :]              # [B, 1, N]
    cross = tf.matmul(q, p, transpose_b=True)                            # [B, M, N]
    return tf.maximum(q_sq - 2.0 * cross + p_sq, 0.0)


def logits(apply_fn, weights, support_x, support_y, query_x, n_way, metric="euclidean",
           bn="transductive"):
    """Query logits ``[B, M, N] = -distances(queries, prototypes)`` of a meta-batch.

    Support and query images are embedded together, one ``apply_fn`` call per meta-batch; batch
    norm takes its statistics from both (``bn='transductive'``) or from the support set alone
    (``'support'``: ``apply_fn`` gets ``bn_rows``, see ``nets.conv4``).
    """
    n_support = support_x.shape[1]
    rows = nets.support_rows(bn, n_support)
    both = tf.concat([support_x, query_x], axis=1)
    embedded = apply_fn(weights, both) if rows is None else apply_fn(weights, both, bn_rows=rows)
    if embedded.shape.rank != 3:
        raise ValueError(f"apply_fn must return embeddings [B, n, D], got shape {embedded.shape}")
    # Named scopes, so a profile shows these ops (and their gradients) apart from the network's.
    with tf.name_scope("prototypes"):
        protos = prototypes(embedded[:, :n_support], support_y, n_way)
    with tf.name_scope("distances"):
        return -distances(embedded[:, n_support:], protos, metric)


def loss_and_logits(apply_fn, weights, episodes, n_way, metric="euclidean", bn="transductive"):
    """Mean cross-entropy over every query of the meta-batch, and the logits ``[B, M, N]``."""
    support_x, support_y, query_x, query_y = episodes
    out = logits(apply_fn, weights, support_x, support_y, query_x, n_way, metric, bn)
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=query_y, logits=out))
    return loss, out


def validate_episode(support_y, query_y, n_way):
    """Host-side (numpy) check of episode labels; raises ``ValueError`` with the culprit.

    Labels are ``[S]`` for one episode or ``[B, S]`` for a meta-batch. Every label must be an
    integer in ``0..n_way-1`` and every support set must contain every class (an empty class would
    get a zero prototype and quietly distort training).
    """
    n_way = _check_n_way(n_way)
    arrays = {}
    for name, y in (("support_y", support_y), ("query_y", query_y)):
        y = np.asarray(y)
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{name} must hold integer labels, got dtype {y.dtype}")
        if y.ndim == 1:
            y = y[None]
        if y.ndim != 2:
            raise ValueError(f"{name} must be [S] or [B, S], got shape {y.shape}")
        bad = np.argwhere((y < 0) | (y >= n_way))
        if bad.size:
            episode, position = bad[0]
            raise ValueError(f"{name}: label {int(y[episode, position])} at episode {episode}, "
                             f"position {position} is outside 0..{n_way - 1} ({n_way}-way)")
        arrays[name] = y
    support, query = arrays["support_y"], arrays["query_y"]
    if support.shape[0] != query.shape[0]:
        raise ValueError(f"support_y has {support.shape[0]} episodes, query_y {query.shape[0]}")
    counts = (support[:, :, None] == np.arange(n_way)).sum(axis=1)       # [B, N]
    empty = np.argwhere(counts == 0)
    if empty.size:
        episode, cls = empty[0]
        missing = np.flatnonzero(counts[episode] == 0).tolist()
        raise ValueError(f"episode {episode}: the support set has no example of class {cls} "
                         f"(missing classes {missing} of {n_way}-way); every class needs at least "
                         f"one support example")


def _check_episodes(episodes):
    if not isinstance(episodes, (tuple, list)) or len(episodes) != 4:
        raise ValueError("episodes must be a tuple (support_x, support_y, query_x, query_y)")


def _validate_raw(episodes, n_way):
    """``validate_episode`` on the labels as given (before any cast could hide a float label)."""
    _check_episodes(episodes)
    validate_episode(episodes[1], episodes[3], n_way)


def _as_weights(weights):
    return [tf.convert_to_tensor(w) for w in weights]


def _as_episodes(episodes, dtype):
    """Tensors ``(support_x, support_y, query_x, query_y)``; images in the weights' dtype."""
    _check_episodes(episodes)
    support_x, support_y, query_x, query_y = episodes
    support_x, query_x = tf.convert_to_tensor(support_x), tf.convert_to_tensor(query_x)
    if dtype is not None:
        support_x, query_x = tf.cast(support_x, dtype), tf.cast(query_x, dtype)
    support_y = tf.cast(tf.convert_to_tensor(support_y), tf.int32)
    query_y = tf.cast(tf.convert_to_tensor(query_y), tf.int32)
    return support_x, support_y, query_x, query_y


def _correct(out, labels, dtype):
    return tf.cast(tf.equal(tf.argmax(out, axis=-1, output_type=labels.dtype), labels), dtype)


def init_state(weights):
    """Training state ``{'weights', 'opt'}`` of plain tensors (as ``maml.init_state``)."""
    weights = _as_weights(weights)
    return {"weights": weights, "opt": optim.adam_init(weights)}


def train_step_parts(apply_fn, *, n_way, lr=1e-3, metric="euclidean", bn="transductive"):
    """The training step split at the gradient, ``(params, gradient, update)``, as
    ``maml.train_step_parts``: ``make_train_step`` composes them in one compiled function and
    ``functional_meta.distribute`` all-reduces the gradient between the two. ``bn='support'``
    trains with the support set's batch-norm statistics, as ``bn='support'`` scores (``logits``)."""
    n_way = _check_n_way(n_way)
    _check_metric(metric)
    nets.support_rows(bn, 1)

    def params(state):
        return list(state["weights"])

    def gradient(state, episodes):
        weights = params(state)
        with tf.GradientTape() as tape:
            tape.watch(weights)
            loss, out = loss_and_logits(apply_fn, state["weights"], episodes, n_way, metric, bn)
        grads = tape.gradient(loss, weights, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        accuracy = tf.reduce_mean(_correct(out, episodes[3], loss.dtype))
        return grads, {"loss": loss, "accuracy": accuracy}

    def update(state, grads):
        weights, opt_state = optim.adam_update(grads, params(state), state["opt"], lr)
        return {"weights": weights, "opt": opt_state}

    return params, gradient, update


def make_train_step(apply_fn, n_way, lr=1e-3, metric="euclidean", jit_compile=True,
                    bn="transductive"):
    """Returns ``step(state, episodes) -> (state, metrics)``, the same contract as MAML's step.

    ``state`` comes from ``init_state(weights)``; ``metrics`` holds ``loss`` and ``accuracy`` (over
    every query of the meta-batch). Loss, gradient (a ``GradientTape`` over the explicit weight
    list) and the Adam update run in one ``tf.function(jit_compile=jit_compile)``. The step is
    pure: it returns new tensors and keeps nothing. Calls with the same shapes and dtypes reuse one
    trace. On CPU, ``jit_compile=False`` (oneDNN convolutions) can be the faster choice.

    The first call checks the labels with ``validate_episode`` before anything is traced; call
    ``validate_episode`` yourself to check later batches. ``step.compiled`` is the
    ``tf.function`` and ``step.tracing_count()`` how many times it has traced.
    """
    _, gradient, update = train_step_parts(apply_fn, n_way=n_way, lr=lr, metric=metric, bn=bn)
    n_way = int(n_way)                                   # checked by train_step_parts

    @tf.function(jit_compile=jit_compile, autograph=False)
    def compiled(state, episodes):
        grads, metrics = gradient(state, episodes)
        return update(state, grads), metrics

    checked = []

    def step(state, episodes):
        weights = _as_weights(state["weights"])
        if not weights:
            raise ValueError("make_train_step needs a non-empty weight list")
        if not checked:
            _validate_raw(episodes, n_way)
            checked.append(True)
        episodes = _as_episodes(episodes, weights[0].dtype)
        count, m, v = state["opt"]
        opt_state = (tf.convert_to_tensor(count), _as_weights(m), _as_weights(v))
        return compiled({"weights": weights, "opt": opt_state}, episodes)

    step.compiled = compiled
    step.tracing_count = compiled.experimental_get_tracing_count
    return step


def make_eval_step(apply_fn, n_way, metric="euclidean", jit_compile=True, bn="transductive"):
    """Returns ``eval_step(weights, episodes) -> (accuracy [B], predictions [B, M])``.

    ``accuracy`` is per episode, ``predictions`` the predicted class of each query. ``n_way`` need
    not be the training way: the embedding has no head. ``bn``: see ``logits``. Labels are checked
    on the first call; ``eval_step.compiled`` and ``eval_step.tracing_count()`` as for
    ``make_train_step``.
    """
    n_way = _check_n_way(n_way)
    _check_metric(metric)
    nets.support_rows(bn, 1)

    @tf.function(jit_compile=jit_compile, autograph=False)
    def compiled(weights, episodes):
        support_x, support_y, query_x, query_y = episodes
        out = logits(apply_fn, weights, support_x, support_y, query_x, n_way, metric, bn)
        predictions = tf.argmax(out, axis=-1, output_type=query_y.dtype)
        accuracy = tf.reduce_mean(_correct(out, query_y, out.dtype), axis=1)
        return accuracy, predictions

    checked = []

    def eval_step(weights, episodes):
        weights = _as_weights(weights)
        if not checked:
            _validate_raw(episodes, n_way)
            checked.append(True)
        episodes = _as_episodes(episodes, weights[0].dtype if weights else None)
        return compiled(weights, episodes)

    eval_step.compiled = compiled
    eval_step.tracing_count = compiled.experimental_get_tracing_count
    return eval_step


def evaluate(apply_fn, weights, sample_fn, num_episodes, n_way, metric="euclidean",
             jit_compile=True, bn="transductive"):
    """Mean accuracy and 95% half-width over ``num_episodes`` episodes: ``(mean_acc, ci95)``.

    ``sample_fn()`` returns a meta-batch ``(support_x, support_y, query_x, query_y)`` (numpy or
    tensors); it is called until ``num_episodes`` episodes are scored (the last meta-batch is cut).
    Every meta-batch's labels are checked with ``validate_episode``.
    """
    n_way = _check_n_way(n_way)
    if isinstance(num_episodes, bool) or not isinstance(num_episodes, (int, np.integer)) \
            or num_episodes < 1:
        raise ValueError(f"num_episodes must be a positive int, got {num_episodes!r}")
    eval_step = make_eval_step(apply_fn, n_way, metric, jit_compile, bn)
    weights = _as_weights(weights)
    accuracies = []
    while len(accuracies) < num_episodes:
        episodes = sample_fn()
        _validate_raw(episodes, n_way)
        accuracy, _ = eval_step(weights, episodes)
        accuracy = np.asarray(accuracy, dtype=np.float64)
        if accuracy.size == 0:
            raise ValueError("sample_fn returned a meta-batch with no episodes")
        accuracies.extend(accuracy[:num_episodes - len(accuracies)].tolist())
    return metrics.mean_confidence_interval(accuracies)
