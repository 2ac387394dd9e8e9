"""MAML (Finn et al. 2017) with exact second-order meta-gradients over explicit weight lists.

A meta-batch is ``tasks = (support_x, support_y, query_x, query_y)``, each with a leading task axis
``T``. The inner loop runs on all tasks at once: the shared weights are broadcast to per-task
copies ``[T, *shape]`` and one gradient of the *sum* of the per-task losses gives every task its own
gradient (task ``i``'s loss depends only on copy ``i``). The network's ``apply`` takes per-task
weights natively (see ``functional_meta.nets``), so nothing loops over tasks and the step compiles
to one XLA graph whose size does not grow with the meta-batch. At the first inner step the copies
are a broadcast, which ``nets`` recognises in a traced graph: its products with them then run once
on the shared tensor for all tasks.

Inner learning rates (``inner_lr``) come in three forms sharing one code path:
- a number: plain MAML's fixed alpha;
- a list with one tensor per weight, broadcastable to it: Meta-SGD (weight-shaped, Li et al. 2017)
  or one learned rate per layer;
- a list over inner steps of such lists: MAML++ per-layer per-step rates (LSLR, Antoniou et al.
  2019). Adapting for more steps than the list holds reuses its last entry.

Inner loop (``inner_loop``): ``'unrolled'`` traces every inner step (TensorFlow differentiates the
unrolled graph); ``'looped'`` runs the steps as one ``tf.while_loop`` whose exact second-order
gradient is a second loop (``_looped_steps``), so the compiled graph does not grow with the steps
and memory grows only by one copy of the weights a step; ``'auto'`` (the default) loops from
``LOOP_FROM`` steps on (docs/inner_loops.md).
"""

import numpy as np
import tensorflow as tf

from functional_meta import nets, optim


def cross_entropy(logits, labels):
    """Per-task mean softmax cross-entropy: logits ``[T, n, N]``, labels ``[T, n]`` -> ``[T]``."""
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits), axis=-1)


def mse(predictions, targets):
    """Per-task mean squared error (the sinusoid experiment): ``[T, n, d]`` -> ``[T]``."""
    return tf.reduce_mean(tf.square(predictions - targets), axis=[-2, -1])


LOSSES = {"cross_entropy": cross_entropy, "mse": mse}


def loss_function(loss):
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)} or a callable, got {loss!r}")
    return LOSSES[loss]


def step_lrs(inner_lr, step, n_weights):
    """The learning rate of each weight at inner step ``step`` (see the module docstring)."""
    if not isinstance(inner_lr, (list, tuple)):
        return [inner_lr] * n_weights
    if isinstance(inner_lr[0], (list, tuple)):
        inner_lr = inner_lr[min(step, len(inner_lr) - 1)]
    if len(inner_lr) != n_weights:
        raise ValueError(f"inner_lr has {len(inner_lr)} entries for {n_weights} weights")
    return list(inner_lr)


def per_task(weights, num_tasks):
    """Broadcast shared weights to per-task copies ``[T, *shape]`` (a no-op for per-task ones)."""
    return [tf.broadcast_to(w, [num_tasks] + w.shape) for w in weights]


INNER_LOOPS = ("auto", "unrolled", "looped")
# inner_loop='auto' loops from this many inner steps on (measured: docs/inner_loops.md).
LOOP_FROM = 3


def loops(inner_loop, steps):
    """Whether ``inner_loop`` (one of ``INNER_LOOPS``) runs ``steps`` inner steps as a loop."""
    if inner_loop not in INNER_LOOPS:
        raise ValueError(f"inner_loop must be one of {list(INNER_LOOPS)}, got {inner_loop!r}")
    return steps >= 2 and (inner_loop == "looped" or (inner_loop == "auto" and steps >= LOOP_FROM))


def support_gradient(apply_fn, weights, x, y, loss=cross_entropy):
    """The gradient of the summed per-task support losses: every task's own gradient."""
    with tf.GradientTape() as tape:
        tape.watch(weights)
        total = tf.reduce_sum(loss(apply_fn(weights, x), y))
    return tape.gradient(total, weights)


def inner_step(apply_fn, weights, x, y, lrs, loss=cross_entropy, first_order=False):
    """One SGD step on every task's support loss: ``w_i <- w_i - lr * grad L_i(w_i)``.

    ``weights`` are per task. The gradient is taken inside the caller's tapes, so an outer tape
    differentiates through it in second order; ``first_order=True`` stops that (FOMAML).
    """
    grads = support_gradient(apply_fn, weights, x, y, loss)
    if first_order:
        grads = [tf.stop_gradient(g) for g in grads]
    return [w - lr * g for w, lr, g in zip(weights, lrs, grads)]


def adapt(apply_fn, weights, x, y, inner_lr, steps, loss=cross_entropy, first_order=False,
          recompute=False, inner_loop="auto"):
    """Algorithm 2, lines 5-7 of the MAML paper: ``steps`` SGD steps on each task's support set.

    ``x``/``y`` carry a leading task axis; returns per-task adapted weights ``[T, *shape]``.
    ``recompute=True`` stores no activations of the inner steps for the backward pass and
    recomputes them instead (memory flat in ``steps``, for about one more forward-backward each).
    ``inner_loop``: see the module docstring (a looped inner loop stores only the weights, so
    ``recompute`` does not apply to it).
    """
    if loops(inner_loop, steps):
        adapted, _ = _looped_adapt(apply_fn, weights, x, y, inner_lr, steps, loss_function(loss),
                                   first_order)
        return adapted
    for weights in adapt_trajectory(apply_fn, weights, x, y, inner_lr, steps, loss, first_order,
                                    recompute):
        pass
    return weights


def adapt_trajectory(apply_fn, weights, x, y, inner_lr, steps, loss=cross_entropy,
                     first_order=False, recompute=False):
    """Yields the per-task weights after each of the ``steps`` inner steps (see ``adapt``)."""
    loss = loss_function(loss)
    weights = per_task(weights, x.shape[0])
    for s in range(steps):
        lrs = step_lrs(inner_lr, s, len(weights))
        if recompute:
            weights = _recomputed_step(apply_fn, weights, x, y, lrs, loss, first_order)
        else:
            weights = inner_step(apply_fn, weights, x, y, lrs, loss, first_order)
        yield weights


def _recomputed_step(apply_fn, weights, x, y, lrs, loss, first_order):
    """``inner_step`` whose activations are recomputed in the backward pass instead of stored."""
    n = len(weights)
    lrs = [tf.convert_to_tensor(lr, weights[0].dtype) for lr in lrs]

    @tf.custom_gradient
    def run(*flat):
        def grad(*upstream):
            # Adding zero times a value of the backward pass makes the recomputation depend on it:
            # it then runs in the backward pass, and XLA cannot merge it with the forward one
            # (common-subexpression elimination would bring the stored activations back).
            after = 0.0 * tf.reduce_sum(upstream[0])
            inputs = [v + tf.cast(after, v.dtype) for v in flat]
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                out = inner_step(apply_fn, inputs[:n], x, y, inputs[n:], loss, first_order)
            return tape.gradient(out, inputs, output_gradients=list(upstream))
        return inner_step(apply_fn, list(flat[:n]), x, y, list(flat[n:]), loss, first_order), grad

    return list(run(*weights, *lrs))


def _looped_adapt(apply_fn, weights, x, y, inner_lr, steps, loss, first_order, query=None):
    """``steps`` inner steps from the shared ``weights`` by ``_looped_steps``. ``query =
    (query_x, query_y, coefficients)``: also the weighted query losses after steps 1 to
    ``steps - 1`` (MAML++'s multi-step loss). Returns ``(adapted, that sum or None)``."""
    n = len(weights)
    weights = per_task(weights, x.shape[0])
    dtype = weights[0].dtype
    if query is not None:          # the loop scores each step's input: none before the first
        query = (query[0], query[1], [0.0] + list(query[2]))
    if isinstance(inner_lr, (list, tuple)) and isinstance(inner_lr[0], (list, tuple)):
        # LSLR: one gather of the per-step entries (the last one repeats), whatever ``steps``.
        index = [min(s, len(inner_lr) - 1) for s in range(steps)]
        tables = [tf.gather(tf.stack([_as_tensor(lrs[j], dtype) for lrs in inner_lr]), index)
                  for j in range(n)]
    else:
        tables = [tf.broadcast_to(lr[None], [steps] + lr.shape)
                  for lr in (_as_tensor(lr, dtype) for lr in step_lrs(inner_lr, 0, n))]
    return _looped_steps(apply_fn, weights, x, y, tables, loss, first_order, query)


def _as_tensor(value, dtype):
    return tf.convert_to_tensor(value, dtype_hint=dtype)


def _sum_to_shape(x, shape):
    """``x`` summed over the axes that broadcasting a ``shape`` tensor to ``x.shape`` adds or
    stretches: the gradient of a broadcast."""
    lead = x.shape.rank - len(shape)
    if lead:
        x = tf.reduce_sum(x, axis=list(range(lead)))
    axes = [i for i, d in enumerate(shape) if d == 1 and x.shape[i] != 1]
    return tf.reduce_sum(x, axis=axes, keepdims=True) if axes else x


def _looped_steps(apply_fn, weights, x, y, tables, loss, first_order, query=None):
    """Inner steps ``w <- w - lr_t * g_t(w)`` from per-task ``weights`` as one ``tf.while_loop``,
    one step per row of the learning-rate ``tables`` (one ``[steps, *lr shape]`` tensor per weight).

    The gradient is the MAML meta-gradient recursion, itself a loop from the last step to the
    first: with ``v`` the gradient with respect to a step's output, ``v <- v - H_t (lr_t v)`` (the
    step's Jacobian is symmetric: ``I - H_t diag(lr_t)`` transposed), with Hessian-vector products
    of the support loss at the stored per-step weights, and ``d lr_t = -<v, g_t>``. With ``query``
    (see ``_looped_adapt``) each step input's query-loss gradient joins ``v`` on the way back.
    Only the weights of each step are stored, never activations: memory grows with the steps by
    one copy of the per-task weights each, and the compiled graph not at all. Equal to
    TensorFlow's gradient of the unrolled steps (tests/test_inner_loop.py); not differentiable
    again (no third order).
    """
    n = len(weights)
    count = tables[0].shape[0]
    dtype = weights[0].dtype
    coefficients = None if query is None else _as_tensor(query[2], dtype)

    def query_loss(w):
        return tf.reduce_mean(loss(apply_fn(w, query[0]), query[1]))

    @tf.custom_gradient
    def run(*flat):
        start, rates = list(flat[:n]), flat[n:]

        def forward(i, ws, stored, extra):
            stored = [a.write(i, w) for a, w in zip(stored, ws)]
            if query is not None:
                extra += coefficients[i] * query_loss(ws)
            grads = support_gradient(apply_fn, ws, x, y, loss)
            return i + 1, [w - r[i] * g for w, r, g in zip(ws, rates, grads)], stored, extra

        stored = [tf.TensorArray(dtype, size=count, element_shape=w.shape) for w in start]
        _, end, stored, extra = tf.while_loop(
            lambda i, *_: i < count, forward, (0, start, stored, tf.zeros([], dtype)),
            maximum_iterations=count)
        stored = [a.stack() for a in stored]

        def backward(*upstream):
            v = [tf.zeros_like(w) if u is None else u for u, w in zip(upstream[:n], end)]
            d_extra = upstream[n] if query is not None and upstream[n] is not None else 0.0

            def body(i, v, d_rates):
                t = count - 1 - i
                ws = [s[t] for s in stored]
                with tf.GradientTape() as tape:
                    tape.watch(ws)
                    grads = support_gradient(apply_fn, ws, x, y, loss)
                    terms = []
                    if not first_order:      # -<g_t, lr_t v>: its gradient is -H_t (lr_t v)
                        terms += [-tf.reduce_sum(g * tf.stop_gradient(r[t] * u))
                                  for g, r, u in zip(grads, rates, v)]
                    if query is not None:
                        terms.append(d_extra * coefficients[t] * query_loss(ws))
                    objective = tf.add_n(terms) if terms else None
                d_rates = [a.write(t, _sum_to_shape(-u * g, r.shape[1:]))
                           for a, u, g, r in zip(d_rates, v, grads, rates)]
                if objective is not None:
                    more = tape.gradient(objective, ws,
                                         unconnected_gradients=tf.UnconnectedGradients.ZERO)
                    v = [u + m for u, m in zip(v, more)]
                return i + 1, v, d_rates

            d_rates = [tf.TensorArray(r.dtype, size=count, element_shape=r.shape[1:])
                       for r in rates]
            _, v, d_rates = tf.while_loop(lambda i, *_: i < count, body, (0, v, d_rates),
                                          maximum_iterations=count)
            return v + [a.stack() for a in d_rates]

        return end + ([extra] if query is not None else []), backward

    out = run(*weights, *tables)
    return (list(out[:n]), out[n] if query is not None else None)


def meta_loss(apply_fn, weights, tasks, *, inner_lr, inner_steps, first_order=False,
              loss="cross_entropy", step_weights=None, recompute=False, inner_loop="auto"):
    """Mean query loss over the meta-batch after adaptation (Algorithm 2, line 10's objective).

    ``step_weights`` (MAML++ multi-step loss): one weight per inner step; the objective becomes
    ``sum_s step_weights[s] * query_loss(after step s+1)``. ``None`` means only the last step.
    ``inner_loop``: unrolled or looped inner steps (module docstring); the same value and gradient.
    Returns ``(loss, query_outputs)`` where ``query_outputs`` are the outputs after the last step.
    """
    support_x, support_y, query_x, query_y = tasks
    loss_fn = loss_function(loss)
    if step_weights is None:
        step_weights = [0.0] * (inner_steps - 1) + [1.0]
    if len(step_weights) != inner_steps:
        raise ValueError(f"step_weights has {len(step_weights)} entries for inner_steps={inner_steps}")
    if inner_steps < 1:
        raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")
    if loops(inner_loop, inner_steps):
        query = (query_x, query_y, list(step_weights[:-1])) if any(step_weights[:-1]) else None
        adapted, extra = _looped_adapt(apply_fn, weights, support_x, support_y, inner_lr,
                                       inner_steps, loss_fn, first_order, query)
        outputs = apply_fn(adapted, query_x)
        total = step_weights[-1] * tf.reduce_mean(loss_fn(outputs, query_y))
        return (total if extra is None else extra + total), outputs
    total = 0.0
    trajectory = adapt_trajectory(apply_fn, weights, support_x, support_y, inner_lr, inner_steps,
                                  loss_fn, first_order, recompute)
    for s, (adapted, step_weight) in enumerate(zip(trajectory, step_weights)):
        if step_weight or s == inner_steps - 1:
            outputs = apply_fn(adapted, query_x)
            total += step_weight * tf.reduce_mean(loss_fn(outputs, query_y))
    return total, outputs


def meta_gradients(apply_fn, weights, tasks, *, inner_lr, inner_steps, first_order=False,
                   loss="cross_entropy", step_weights=None, recompute=False, inner_loop="auto"):
    """The meta-loss and its exact gradient with respect to ``weights`` (one entry per weight).

    Second order by default: the tape sees the inner gradient computation and differentiates
    through it. Example::

        init, apply = nets.conv4(n_way=5)
        weights = init(seed=0)
        loss, grads = maml.meta_gradients(apply, weights, tasks, inner_lr=0.4, inner_steps=1)
    """
    with tf.GradientTape() as tape:
        tape.watch(weights)
        value, _ = meta_loss(apply_fn, weights, tasks, inner_lr=inner_lr, inner_steps=inner_steps,
                             first_order=first_order, loss=loss, step_weights=step_weights,
                             recompute=recompute, inner_loop=inner_loop)
    return value, tape.gradient(value, weights)


def init_inner_lrs(weights, inner_lr, mode, inner_steps=1):
    """Learnable inner learning rates initialised to ``inner_lr``.

    ``mode='fixed'`` returns a scalar tensor (nothing is learned); ``'metasgd'`` one rate per weight
    element; ``'lslr'`` one rate per weight tensor and inner step.
    """
    dtype = weights[0].dtype
    if mode == "fixed":
        return tf.constant(inner_lr, dtype)
    if mode == "metasgd":
        return [tf.fill(w.shape, tf.cast(inner_lr, dtype)) for w in weights]
    if mode == "lslr":
        return [[tf.constant(inner_lr, dtype) for _ in weights] for _ in range(inner_steps)]
    raise ValueError(f"inner-lr mode must be 'fixed', 'metasgd' or 'lslr', got {mode!r}")


def init_state(weights, inner_lr=0.4, lr_mode="fixed", inner_steps=1):
    """Meta-training state: ``{'weights', 'inner_lr', 'opt'}``, all plain tensors.

    The outer optimiser (Adam) updates the weights and, unless ``lr_mode='fixed'``, the inner rates.
    """
    lrs = init_inner_lrs(weights, inner_lr, lr_mode, inner_steps)
    learned = [] if lr_mode == "fixed" else tf.nest.flatten(lrs)
    return {"weights": list(weights), "inner_lr": lrs, "opt": optim.adam_init(list(weights) + learned)}


def train_step_parts(apply_fn, *, inner_steps, outer_lr=1e-3, first_order=False,
                     loss="cross_entropy", step_weights=None, clip_norm=None, recompute=False,
                     task_chunk=None, inner_loop="auto"):
    """The meta-training step split at the gradient: ``(params, gradient, update)``.

    ``params(state)`` lists what the outer optimiser learns (the weights, then any learned inner
    rates); ``gradient(state, tasks) -> (grads, metrics)`` gives the meta-gradient of the mean
    meta-loss with respect to ``params(state)``, and ``metrics`` its value (``loss``) and, for
    classification, the post-adaptation query ``accuracy``; ``update(state, grads) -> state``
    clips (optionally) and applies Adam. ``make_train_step`` composes them in one compiled
    function; ``functional_meta.distribute`` all-reduces the gradient between the two.

    ``task_chunk``: compute the meta-gradient for this many tasks at a time, in a loop inside the
    step that sums the chunks' gradients: the same value and gradient as the whole meta-batch at
    once (``None``, the default). It must divide the meta-batch. The loop's body is compiled once,
    so the compile time does not grow, while a chunk's activations stay in the CPU's caches and the
    step's memory is a fraction of the whole batch's (docs/design.md, task chunks).
    """
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, (int, np.integer)) \
            or inner_steps < 1:
        raise ValueError(f"inner_steps must be a positive integer, got {inner_steps!r}")
    loss_function(loss)
    loops(inner_loop, inner_steps)
    if task_chunk is not None and (isinstance(task_chunk, bool)
                                   or not isinstance(task_chunk, (int, np.integer))
                                   or task_chunk < 1):
        raise ValueError(f"task_chunk must be a positive int or None, got {task_chunk!r}")

    def params(state):
        inner_lr = state["inner_lr"]
        learned = tf.nest.flatten(inner_lr) if isinstance(inner_lr, (list, tuple)) else []
        return list(state["weights"]) + learned

    def chunk_gradient(state, tasks):
        learned = params(state)
        with tf.GradientTape() as tape:
            tape.watch(learned)
            value, outputs = meta_loss(apply_fn, state["weights"], tasks,
                                       inner_lr=state["inner_lr"], inner_steps=inner_steps,
                                       first_order=first_order, loss=loss,
                                       step_weights=step_weights, recompute=recompute,
                                       inner_loop=inner_loop)
        grads = tape.gradient(value, learned, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        metrics = {"loss": value}
        if loss == "cross_entropy":
            metrics["accuracy"] = accuracy(outputs, tasks[3], value.dtype)
        return grads, metrics

    def gradient(state, tasks):
        names = ["loss", "accuracy"] if loss == "cross_entropy" else ["loss"]
        return chunked_gradient(chunk_gradient, state, tasks, task_chunk, params(state), names)

    def update(state, grads):
        grads = optim.clip_by_global_norm(grads, clip_norm)
        new, opt = optim.adam_update(grads, params(state), state["opt"], outer_lr)
        n = len(state["weights"])
        inner_lr = state["inner_lr"]
        if isinstance(inner_lr, (list, tuple)):
            inner_lr = tf.nest.pack_sequence_as(inner_lr, new[n:])
        return {"weights": new[:n], "inner_lr": inner_lr, "opt": opt}

    return params, gradient, update


def chunked_gradient(chunk_gradient, state, tasks, task_chunk, like, names):
    """``chunk_gradient(state, tasks) -> (grads, metrics)`` over the meta-batch ``task_chunk``
    tasks at a time (``None``: all at once), in a loop that sums the chunks' gradients (shaped
    ``like``) and ``names`` metrics; their means over the meta-batch, as ``chunk_gradient`` of the
    whole. See ``train_step_parts``."""
    size = tasks[0].shape[0]
    chunk = size if task_chunk is None else int(task_chunk)
    if size % chunk:
        raise ValueError(f"task_chunk={chunk} must divide the meta-batch ({size} tasks)")
    if chunk == size:
        return chunk_gradient(state, tasks)
    count = size // chunk
    chunks = [tf.reshape(t, [count, chunk] + t.shape[1:]) for t in tasks]

    def body(i, grads, metrics):
        more, extra = chunk_gradient(state, tuple(t[i] for t in chunks))
        return (i + 1, [a + b for a, b in zip(grads, more)],
                {name: metrics[name] + extra[name] for name in metrics})

    start = ([tf.zeros_like(p) for p in like],
             {name: tf.zeros([], like[0].dtype) for name in names})
    _, grads, metrics = tf.while_loop(lambda i, *_: i < count, body, (0,) + start,
                                      maximum_iterations=count)
    # Equal chunks: the mean over the meta-batch is the mean of the chunks' means.
    return ([g / count for g in grads], {name: v / count for name, v in metrics.items()})


def make_train_step(apply_fn, *, jit_compile=True, **options):
    """The whole meta-training step as one compiled function: ``step(state, tasks) -> (state, metrics)``.

    Inner loop over the meta-batch, meta-gradient through it (second order unless ``first_order``),
    optional gradient clipping and the Adam update, in one ``tf.function(jit_compile=...)``.
    ``options`` are those of ``train_step_parts`` (``inner_steps``, ``outer_lr``, ``first_order``,
    ``loss``, ``step_weights``, ``clip_norm``, ``recompute``, ``task_chunk``, ``inner_loop``).
    ``metrics`` holds the meta-loss and, for classification, the post-adaptation query accuracy.

    AutoGraph is off (here and in every compiled step of the library): nothing in the step branches
    on a tensor's value, and converting the library's Python would double the trace time
    (docs/design.md, AutoGraph off). An ``apply_fn`` must therefore use
    ``tf.cond``/``tf.while_loop`` for any control flow that depends on tensor values.
    """
    _, gradient, update = train_step_parts(apply_fn, **options)
    return compile_step(gradient, update, jit_compile)


def compile_step(gradient, update, jit_compile=True):
    """``step(state, tasks) -> (state, metrics)``: a step's ``gradient(state, tasks) -> (grads,
    metrics)`` and ``update(state, grads) -> state`` as one ``tf.function`` (AutoGraph off)."""

    @tf.function(jit_compile=jit_compile, autograph=False)
    def step(state, tasks):
        grads, metrics = gradient(state, tasks)
        return update(state, grads), metrics

    return step


def accuracy(logits, labels, dtype=tf.float32):
    """Mean argmax accuracy over all of ``labels`` (any shape), as a ``dtype`` scalar."""
    hits = tf.equal(tf.argmax(logits, -1, output_type=labels.dtype), labels)
    return tf.reduce_mean(tf.cast(hits, dtype))


def query_outputs(apply_fn, weights, support_x, query_x, bn="transductive"):
    """The network's outputs on the query sets ``[T, M, ...]`` with (adapted) ``weights``.

    ``bn='transductive'`` runs the query sets alone, so batch norm normalises each with its own
    statistics (as the meta-loss trains); ``'support'`` runs support and query sets together with
    the statistics of the support set only (``nets.support_rows``), so each query's output is
    independent of the other queries.
    """
    n_support = support_x.shape[1]
    rows = nets.support_rows(bn, n_support)
    if rows is None:
        return apply_fn(weights, query_x)
    both = apply_fn(weights, tf.concat([support_x, query_x], axis=1), bn_rows=rows)
    return both[:, n_support:]


def score_queries(outputs, labels, loss):
    """``(per-task query loss [T], per-task accuracy [T])`` of adapted ``outputs``; for regression
    (``loss='mse'``) the second value is the loss again."""
    losses = loss_function(loss)(outputs, labels)
    if loss == "cross_entropy":
        hits = tf.equal(tf.argmax(outputs, -1, output_type=labels.dtype), labels)
        return losses, tf.reduce_mean(tf.cast(hits, losses.dtype), axis=-1)
    return losses, losses


def make_eval_step(apply_fn, *, inner_steps, loss="cross_entropy", jit_compile=True,
                   inner_loop="auto", bn="transductive"):
    """Adapt on each support set (``inner_steps`` may differ from training) and score the queries.

    Returns ``evaluate(weights, inner_lr, tasks) -> (per-task query loss [T], per-task accuracy [T])``
    (accuracy only for classification; for regression the second value is the loss again).
    ``bn``: the queries' batch-norm statistics (``query_outputs``).
    """
    loss_fn = loss_function(loss)
    nets.support_rows(bn, 1)

    @tf.function(jit_compile=jit_compile, autograph=False)
    def evaluate(weights, inner_lr, tasks):
        support_x, support_y, query_x, query_y = tasks
        adapted = adapt(apply_fn, weights, support_x, support_y, inner_lr, inner_steps, loss_fn,
                        first_order=True, inner_loop=inner_loop)
        outputs = query_outputs(apply_fn, adapted, support_x, query_x, bn)
        return score_queries(outputs, query_y, loss)

    return evaluate
