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

- **Transductive refinement** (``transductive_steps``; soft k-means, Ren et al. 2018): the
  prototypes are recomputed a few times as means of the support images and of every query
  weighted by the current probability of its class. It uses the episode's queries together, so
  it is transductive whatever ``bn`` says.

An ensemble of such models (``make_ensemble_eval_step``) predicts the class of highest mean
log-probability over its members, each scored with the same options.

All but the refinement are inductive with ``bn='support'``: batch norm takes its statistics from
the support views alone and each query is scored on its own; under ``'transductive'`` the whole
episode's statistics are used, as in ProtoNet's training. The fine-tuning passes see only the
support views. Everything per episode batch runs in one ``tf.function``::

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
    """Query logits of the adapted model: ProtoNet's on the support views when ``steps == 0``
    (``prototype_logits``), else the fine-tuned head's (``adapted_logits``); with
    ``query_views`` each query's logits are the mean over its ``views`` views."""
    if steps == 0:
        support, support_y, queries = embeddings(apply_fn, weights, episodes, views=views,
                                                 query_views=query_views, bn=bn)
        return prototype_logits(queries, protonet.prototypes(support, support_y, n_way), metric)
    if query_views:
        support_x, support_y, query_x, query_y = episodes
        b, m = query_x.shape[:2]
        viewed, _ = _views(query_x, query_y, views)
        out = logits(apply_fn, weights, (support_x, support_y, viewed, query_y), n_way,
                     steps=steps, lr=lr, views=views, metric=metric, bn=bn)
        return tf.reduce_mean(tf.reshape(out, [b, views, m, n_way]), axis=1)
    return adapted_logits(apply_fn, weights, episodes, n_way, steps=steps, lr=lr, views=views,
                          bn=bn)


def embeddings(apply_fn, weights, episodes, *, views=1, query_views=False, bn="transductive"):
    """``(support [B, V*S, D], support_y [B, V*S], queries [B, Q, M, D])``: the support set's
    ``views`` views and the queries (their ``views`` views with ``query_views``, ``Q`` of them,
    else ``Q = 1``), embedded by one ``apply_fn`` call (batch norm as ``bn`` says)."""
    support_x, support_y, query_x, query_y = episodes
    b, m = query_x.shape[:2]
    support_x, support_y = _views(support_x, support_y, views)
    if query_views:
        query_x, _ = _views(query_x, query_y, views)
    support, queries = _embed(apply_fn, weights, support_x, query_x, bn)
    return support, support_y, tf.reshape(queries, [b, -1, m, queries.shape[-1]])


def prototype_logits(queries, protos, metric="euclidean"):
    """``-distances`` of ``queries [B, Q, M, D]`` (``Q`` views of each) to ``protos [B, N, D]``,
    averaged over the views: ``[B, M, N]``."""
    b, q, m = queries.shape[:3]
    with tf.name_scope("distances"):
        out = -protonet.distances(tf.reshape(queries, [b, q * m, -1]), protos, metric)
    return tf.reduce_mean(tf.reshape(out, [b, q, m, -1]), axis=1)


def soft_kmeans_prototypes(support_sums, support_counts, query_means, assignment):
    """One refinement of the prototypes by the unlabelled queries (soft k-means, Ren et al. 2018):
    class ``k``'s prototype is the weighted mean of its support images (weight 1 each; their sum
    ``support_sums [B, N, D]`` and count ``support_counts [B, N]``, ``support_sums`` gives them)
    and of every query (``query_means [B, M, D]``, each the mean of its views; weight
    ``assignment [B, M, N]``, e.g. the posterior ``p(k | query)``). Transductive: a prototype
    depends on all the episode's queries."""
    sums = support_sums + tf.matmul(assignment, query_means, transpose_a=True)
    counts = support_counts + tf.reduce_sum(assignment, axis=1)
    return sums / counts[:, :, None]


def support_sums(support, support_y, n_way, views=1):
    """Per class, the sum ``[B, N, D]`` and count ``[B, N]`` of the support images, each the mean
    of its ``views`` views (``support [B, V*S, D]`` as ``embeddings`` gives it)."""
    labelled = tf.one_hot(support_y, n_way, dtype=support.dtype) / views        # [B, V*S, N]
    return tf.matmul(labelled, support, transpose_a=True), tf.reduce_sum(labelled, axis=1)


def check_options(steps, lr, views, metric, query_views=False, transductive_steps=0):
    """``ValueError`` naming the option (the fm-eval flag) unless the adaptation is possible."""
    if isinstance(transductive_steps, bool) or not isinstance(transductive_steps, (int, np.integer)) \
            or not 0 <= transductive_steps <= MAX_TRANSDUCTIVE_STEPS:
        raise ValueError(f"transductive_steps (--transductive_steps) must be an integer in "
                         f"[0, {MAX_TRANSDUCTIVE_STEPS}], got {transductive_steps!r}")
    if transductive_steps and steps:
        raise ValueError("transductive_steps (--transductive_steps) refines ProtoNet's prototypes; "
                         "it cannot follow fine-tuning (--finetune_steps), whose head it would "
                         "replace")
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


# Soft k-means refinements are unrolled in the compiled step; a few converge (docs/accuracy.md).
MAX_TRANSDUCTIVE_STEPS = 20

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
                   transductive_steps=0, metric="euclidean", jit_compile=True, bn="transductive",
                   episode_chunk=EPISODE_CHUNK):
    """``eval_step(weights, episodes) -> (accuracy [B], predictions [B, M])`` as
    ``protonet.make_eval_step``, with the episode batch's whole adaptation and scoring in one
    ``tf.function(jit_compile=jit_compile)``; fine-tuning and views of the queries run
    ``episode_chunk`` episodes at a time (``in_chunks``)."""
    step = make_ensemble_eval_step([(apply_fn, metric, bn)], n_way, steps=steps, lr=lr,
                                   views=views, query_views=query_views,
                                   transductive_steps=transductive_steps,
                                   jit_compile=jit_compile, episode_chunk=episode_chunk)

    def eval_step(weights, episodes):
        return step([weights], episodes)[:2]

    eval_step.compiled = step.compiled
    return eval_step


def ensemble_logits(members, weights, episodes, n_way, *, transductive_steps=0, **options):
    """The queries' mean log-probabilities ``[B, M, N]`` over an ensemble: member ``i``,
    ``(apply_fn, metric, bn)`` under ``weights[i]``, scored by ``logits`` with the shared test-time
    ``options``; and the members' own logits, a list. One member: its logits as they are.

    ``transductive_steps``: the prototypes are refined that many times by the episode's queries
    (``refined_logits``): the ensemble's jointly, each query weighted by the ensemble's posterior,
    and each member's own alone, as when it is scored by itself."""
    if not transductive_steps:
        out = [logits(apply_fn, w, episodes, n_way, metric=metric, bn=bn, **options)
               for (apply_fn, metric, bn), w in zip(members, weights)]
        return _mean_log_probability(out), out
    views = options.get("views", 1)
    parts = [(metric, *embeddings(apply_fn, w, episodes, views=views,
                                  query_views=options.get("query_views", False), bn=bn))
             for (apply_fn, metric, bn), w in zip(members, weights)]
    own = [refined_logits([part], n_way, transductive_steps, views)[0] for part in parts]
    joint = refined_logits(parts, n_way, transductive_steps, views) if len(parts) > 1 else own
    return _mean_log_probability(joint), own


def refined_logits(parts, n_way, steps, views=1):
    """Transductive prototypes: the logits (``prototype_logits``) of members ``parts``, each
    ``(metric, support, support_y, queries)`` as ``embeddings`` gives them, after ``steps`` soft
    k-means refinements (``soft_kmeans_prototypes``) that weight each query by the members'
    current posterior (the softmax of their mean log-probability)."""
    protos = [protonet.prototypes(support, support_y, n_way) for _, support, support_y, _ in parts]
    # What a refinement does not change, once: the support sums and each query's mean view.
    fixed = [(*support_sums(support, support_y, n_way, views), tf.reduce_mean(queries, axis=1))
             for _, support, support_y, queries in parts]
    for step in range(steps + 1):
        out = [prototype_logits(queries, p, metric)
               for (metric, _, _, queries), p in zip(parts, protos)]
        if step == steps:
            return out
        posterior = tf.nn.softmax(_mean_log_probability(out))
        protos = [soft_kmeans_prototypes(*f, posterior) for f in fixed]


def _mean_log_probability(member_logits):
    if len(member_logits) == 1:
        return member_logits[0]
    return tf.add_n([tf.nn.log_softmax(o) for o in member_logits]) / len(member_logits)


def make_ensemble_eval_step(members, n_way, *, steps=0, lr=0.0, views=1, query_views=False,
                            transductive_steps=0, jit_compile=True, episode_chunk=EPISODE_CHUNK):
    """``eval_step(weights, episodes) -> (accuracy [B], predictions [B, M], member_accuracy
    [B, K])`` of the ensemble of ``members`` (``(apply_fn, metric, bn)`` each; ``weights``: one list
    per member), predicting the class of highest mean log-probability (``ensemble_logits``); each
    member's own accuracy comes from the same pass. One compiled function."""
    n_way = protonet._check_n_way(n_way)
    if not members:
        raise ValueError("an ensemble needs at least one member")
    for _, metric, bn in members:
        check_options(steps, lr, views, metric, query_views, transductive_steps)
        nets.support_rows(bn, 1)
    steps, lr, views, query_views = int(steps), float(lr), int(views), bool(query_views)
    transductive_steps = int(transductive_steps)

    @tf.function(jit_compile=jit_compile, autograph=False)
    def compiled(weights, episodes):
        def batch_logits(part):      # [b, 1 + K, M, N]: the ensemble's, then each member's
            mean, each = ensemble_logits(members, weights, part, n_way, steps=steps, lr=lr,
                                         views=views, query_views=query_views,
                                         transductive_steps=transductive_steps)
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
