"""Test-time adaptation of a ProtoNet-style embedding to each episode: fine-tuning on the support
set with a head initialised from the prototypes, and test-time augmentation of the support set.

- **Test-time augmentation** (``views``): the support set is embedded under a few fixed image
  transforms (``VIEWS``: the identity, one-pixel shifts, small rotations and scalings) and each
  prototype is the mean over its examples' views; queries are embedded as they are, or
  (``query_views``) under the same views with each query's logits averaged over them. For
  euclidean scores that ranks the classes as the mean of the query's view embeddings would:
  ``sum_v |q_v - c|^2 = V |mean_v q_v - c|^2 + sum_v |q_v - mean_v q_v|^2``, the last term the
  same for every class ``c``.
- **Fine-tuning** (Proto-MAML, Triantafillou et al. 2020): a linear head ``W = 2 c_k``,
  ``b = -|c_k|^2`` from the prototypes ``c_k`` scores ``f . W_k + b_k``, which is ProtoNet's
  ``-|f - c_k|^2`` up to ``|f|^2``, the same for every class (the same softmax). Embedding and
  head then take ``steps`` gradient steps of rate ``lr`` on the cross-entropy of the support set's
  views (the only labelled data of an episode) and score the queries with the adapted head. In
  1-shot episodes without other views each support image sits on its own prototype and its loss
  is near zero: the views are what the fine-tuning learns from.

An ensemble of such models (``make_ensemble_eval_step``) predicts the class of highest mean
log-probability over its members, each scored with the same options.

All are inductive with ``bn='support'``: batch norm takes its statistics from the support
views alone and each query is scored on its own; under ``'transductive'`` the whole episode's
statistics are used, as in ProtoNet's training. The fine-tuning passes see only the support
views. Everything per episode batch runs in one ``tf.function``::

    step = adaptation.make_eval_step(apply, n_way=20, steps=10, lr=0.01, views=5, bn="support")
    accuracy, predictions = step(weights, (support_x, support_y, query_x, query_y))
"""

import numpy as np
import tensorflow as tf

from functional_meta import episodes, maml, nets, protonet

# The fixed support-set transforms, in the order ``views=N`` takes the first N of them.
VIEWS = ("identity", "shift_down", "shift_up", "shift_right", "shift_left", "rotate_+10",
         "rotate_-10", "scale_0.9", "scale_1.1")
_SHIFTS = {"shift_down": (1, 0), "shift_up": (-1, 0), "shift_right": (0, 1), "shift_left": (0, -1)}


def _transform(name, images):
    """The view ``name`` of float ``images [n, H, W, C]`` (zero fill)."""
    n = len(images)
    if name == "identity":
        return images
    if name in _SHIFTS:
        dy, dx = _SHIFTS[name]
        h, w = images.shape[1:3]
        padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return padded[:, 1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
    kind, value = name.split("_")
    if kind == "rotate":
        return episodes.warp(images, np.full(n, float(value)), np.ones(n))
    return episodes.warp(images, np.zeros(n), np.full(n, float(value)))


def check_views(views):
    """``ValueError`` naming ``views`` unless it is an int in ``1..len(VIEWS)``."""
    if isinstance(views, bool) or not isinstance(views, (int, np.integer)) \
            or not 1 <= views <= len(VIEWS):
        raise ValueError(f"views (--tta) must be an integer in 1..{len(VIEWS)} (the first N of "
                         f"{', '.join(VIEWS)}), got {views!r}")


def view_matrices(views, height, width):
    """``[views, H*W, H*W]`` float64: row-major image vector ``v`` becomes ``M[i] @ v`` under the
    ``i``-th of ``VIEWS``. Each transform is linear in the pixels, so one product applies it
    inside a compiled function."""
    check_views(views)
    basis = np.eye(height * width).reshape(height * width, height, width, 1)
    return np.stack([_transform(name, basis).reshape(height * width, height * width).T
                     for name in VIEWS[:views]])


def augment(x, matrices):
    """``x [B, S, H, W, C]`` under each view: ``[B, V*S, H, W, C]``, view after view."""
    b, s, h, w, c = x.shape
    m = tf.constant(matrices, x.dtype)
    out = tf.einsum("vij,bsjc->bvsic", m, tf.reshape(x, [b, s, h * w, c]))
    return tf.reshape(out, [b, len(matrices) * s, h, w, c])


def head_from_prototypes(protos):
    """Proto-MAML's head ``(W [B, N, D], b [B, N])`` from prototypes ``[B, N, D]``."""
    return 2.0 * protos, -tf.reduce_sum(tf.square(protos), axis=-1)


def head_logits(embeddings, head):
    """``embeddings [B, M, D]`` scored by a per-episode head: ``[B, M, N]``."""
    w, b = head
    return tf.einsum("bmd,bnd->bmn", embeddings, w) + b[:, None, :]


def with_head(apply_fn):
    """``apply(params, x) -> logits``: the embedding ``apply_fn`` under ``params[:-2]`` scored by
    the head ``params[-2:]`` (per-episode ``W``, ``b``)."""
    def apply(params, x):
        return head_logits(apply_fn(params[:-2], x), params[-2:])
    return apply


def support_loss(apply_fn, params, support_x, support_y):
    """Per-episode mean cross-entropy ``[B]`` of the support set under ``params`` (per-episode
    embedding weights, then the head's ``W`` and ``b``); batch norm from the support set."""
    return maml.cross_entropy(with_head(apply_fn)(params, support_x), support_y)


def finetune(apply_fn, weights, head, support_x, support_y, steps, lr):
    """``steps`` gradient-descent steps of rate ``lr`` on every episode's ``support_loss`` (MAML's
    inner step on embedding and head): per-episode ``(weights [B, ...], head)``."""
    params = maml.per_task(weights, support_x.shape[0]) + list(head)

    def body(i, params):
        return i + 1, maml.inner_step(with_head(apply_fn), params, support_x, support_y,
                                      [lr] * len(params))
    if steps:       # a loop, so a compiled function traces the step once, not ``steps`` times
        _, params = tf.while_loop(lambda i, _: i < steps, body, (tf.constant(0), params))
    return params[:-2], tuple(params[-2:])


def _embed(apply_fn, weights, support_x, query_x, bn):
    """Support and query embeddings from one ``apply_fn`` call (batch norm as ``bn`` says)."""
    n_support = support_x.shape[1]
    rows = nets.support_rows(bn, n_support)
    both = tf.concat([support_x, query_x], axis=1)
    out = apply_fn(weights, both) if rows is None else apply_fn(weights, both, bn_rows=rows)
    return out[:, :n_support], out[:, n_support:]


def adapted_logits(apply_fn, weights, episodes, n_way, *, steps, lr, views=1,
                   bn="transductive"):
    """Query logits ``[B, M, N]`` of the head after ``steps`` fine-tuning steps (0: the head as
    initialised, ProtoNet's euclidean logits plus ``|f|^2``); support set augmented by the first
    ``views`` of ``VIEWS``."""
    support_x, support_y, query_x, _ = episodes
    support_x, support_y = _views(support_x, support_y, views)
    if bn == "support":   # the support rows alone: the same statistics, without the queries
        embedded = apply_fn(weights, support_x)
    else:
        embedded, _ = _embed(apply_fn, weights, support_x, query_x, bn)
    head = head_from_prototypes(protonet.prototypes(embedded, support_y, n_way))
    weights, head = finetune(apply_fn, weights, head, support_x, support_y, steps, lr)
    _, queries = _embed(apply_fn, weights, support_x, query_x, bn)
    return head_logits(queries, head)


def _views(support_x, support_y, views):
    if views == 1:
        return support_x, support_y
    h, w = support_x.shape[2:4]
    return (augment(support_x, view_matrices(views, h, w)),
            tf.tile(support_y, [1, views]))


def logits(apply_fn, weights, episodes, n_way, *, steps=0, lr=0.0, views=1, query_views=False,
           metric="euclidean", bn="transductive"):
    """Query logits of the adapted model: ProtoNet's (``protonet.logits``) on the support views
    when ``steps == 0``, else the fine-tuned head's (``adapted_logits``); with ``query_views``
    each query's logits are the mean over its ``views`` views."""
    if query_views:
        support_x, support_y, query_x, query_y = episodes
        b, m = query_x.shape[:2]
        viewed, _ = _views(query_x, query_y, views)
        out = logits(apply_fn, weights, (support_x, support_y, viewed, query_y), n_way,
                     steps=steps, lr=lr, views=views, metric=metric, bn=bn)
        return tf.reduce_mean(tf.reshape(out, [b, views, m, n_way]), axis=1)
    if steps == 0:
        support_x, support_y, query_x, _ = episodes
        support_x, support_y = _views(support_x, support_y, views)
        return protonet.logits(apply_fn, weights, support_x, support_y, query_x, n_way, metric,
                               bn)
    return adapted_logits(apply_fn, weights, episodes, n_way, steps=steps, lr=lr, views=views,
                          bn=bn)


def check_options(steps, lr, views, metric, query_views=False):
    """``ValueError`` naming the option (the fm-eval flag) unless the adaptation is possible."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps (--finetune_steps) must be a non-negative integer, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not np.isfinite(lr) or lr < 0:
        raise ValueError(f"lr (--finetune_lr) must be a non-negative number, got {lr!r}")
    if steps and not lr:
        raise ValueError(f"steps={steps} fine-tuning steps (--finetune_steps) need lr > 0 "
                         f"(--finetune_lr)")
    check_views(views)
    if query_views and views == 1:
        raise ValueError("query_views (--tta_queries) averages over the --tta views: it needs "
                         "views > 1 (--tta=2..9)")
    if steps and metric != "euclidean":
        raise ValueError(f"fine-tuning (--finetune_steps) initialises its head from euclidean "
                         f"prototypes; this model uses metric={metric!r}")


# Episodes fine-tuned, or scored with views of their queries, at a time: each fine-tuned one has
# its own copy of the weights, and a batch of 25 20-way episodes with 5 views held about 7 GiB of
# activations at once; with 5 views of 300 queries each, conv4-128's first activation alone has
# 4e9 values for 25 episodes, past what one oneDNN convolution takes (it crashed).
EPISODE_CHUNK = 5


def in_chunks(fn, episodes, chunk):
    """``fn(episodes)`` (a ``[B, ...]`` tensor of the images' dtype) computed for ``chunk``
    episodes at a time in a loop that traces ``fn`` once (the largest divisor of ``B`` up to
    ``chunk``), so only one chunk's activations live."""
    b = episodes[0].shape[0]
    chunk = max(d for d in range(1, min(chunk, b) + 1) if b % d == 0)
    if chunk == b:
        return fn(episodes)
    parts = tuple(tf.reshape(a, [b // chunk, chunk] + a.shape[1:]) for a in episodes)
    out = tf.map_fn(fn, parts, fn_output_signature=episodes[0].dtype, parallel_iterations=1)
    return tf.reshape(out, [b] + out.shape[2:])


def make_eval_step(apply_fn, n_way, *, steps=0, lr=0.0, views=1, query_views=False,
                   metric="euclidean", jit_compile=True, bn="transductive",
                   episode_chunk=EPISODE_CHUNK):
    """``eval_step(weights, episodes) -> (accuracy [B], predictions [B, M])`` as
    ``protonet.make_eval_step``, with the episode batch's whole adaptation and scoring in one
    ``tf.function(jit_compile=jit_compile)``; fine-tuning and views of the queries run
    ``episode_chunk`` episodes at a time (``in_chunks``)."""
    step = make_ensemble_eval_step([(apply_fn, metric, bn)], n_way, steps=steps, lr=lr,
                                   views=views, query_views=query_views,
                                   jit_compile=jit_compile, episode_chunk=episode_chunk)

    def eval_step(weights, episodes):
        return step([weights], episodes)[:2]

    eval_step.compiled = step.compiled
    return eval_step


def ensemble_logits(members, weights, episodes, n_way, **options):
    """The queries' mean log-probabilities ``[B, M, N]`` over an ensemble: member ``i``,
    ``(apply_fn, metric, bn)`` under ``weights[i]``, scored by ``logits`` with the shared test-time
    ``options``; and the members' own logits, a list. One member: its logits as they are."""
    out = [logits(apply_fn, w, episodes, n_way, metric=metric, bn=bn, **options)
           for (apply_fn, metric, bn), w in zip(members, weights)]
    if len(out) == 1:
        return out[0], out
    return tf.add_n([tf.nn.log_softmax(o) for o in out]) / len(out), out


def make_ensemble_eval_step(members, n_way, *, steps=0, lr=0.0, views=1, query_views=False,
                            jit_compile=True, episode_chunk=EPISODE_CHUNK):
    """``eval_step(weights, episodes) -> (accuracy [B], predictions [B, M], member_accuracy
    [B, K])`` of the ensemble of ``members`` (``(apply_fn, metric, bn)`` each; ``weights``: one list
    per member), predicting the class of highest mean log-probability (``ensemble_logits``); each
    member's own accuracy comes from the same pass. One compiled function."""
    n_way = protonet._check_n_way(n_way)
    if not members:
        raise ValueError("an ensemble needs at least one member")
    for _, metric, bn in members:
        check_options(steps, lr, views, metric, query_views)
        nets.support_rows(bn, 1)
    steps, lr, views, query_views = int(steps), float(lr), int(views), bool(query_views)

    @tf.function(jit_compile=jit_compile, autograph=False)
    def compiled(weights, episodes):
        def batch_logits(part):      # [b, 1 + K, M, N]: the ensemble's, then each member's
            mean, each = ensemble_logits(members, weights, part, n_way, steps=steps, lr=lr,
                                         views=views, query_views=query_views)
            return tf.stack([mean] + each, axis=1)
        chunk = episode_chunk if steps or query_views else episodes[0].shape[0]
        out = in_chunks(batch_logits, episodes, chunk)
        query_y = episodes[3]
        predictions = tf.argmax(out, axis=-1, output_type=query_y.dtype)
        correct = tf.cast(tf.equal(predictions, query_y[:, None]), out.dtype)
        accuracy = tf.reduce_mean(correct, axis=2)
        return accuracy[:, 0], predictions[:, 0], accuracy[:, 1:]

    checked = []

    def eval_step(weights, episodes):
        if len(weights) != len(members):
            raise ValueError(f"{len(weights)} weight lists for {len(members)} members")
        weights = [protonet._as_weights(w) for w in weights]
        if not checked:
            protonet._validate_raw(episodes, n_way)
            checked.append(True)
        return compiled(weights, protonet._as_episodes(episodes, weights[0][0].dtype))

    eval_step.compiled = compiled
    return eval_step
