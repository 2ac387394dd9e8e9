"""MLDG (Li, Yang, Song & Hospedales, AAAI 2018, "Learning to Generalize: Meta-Learning for Domain
Generalization", Algorithm 1) and ERM on the pooled domains, its baseline: supervised classifiers
over a fixed label set, trained on several source domains to be scored on an unseen one.

A batch is one minibatch per training domain, ``(x [D, n, *in_shape], y [D, n])``, the domains
in a random order each step (``domains.DomainBatchSampler``); the first ``D - meta_test`` are
the step's meta-train domains, the last ``meta_test`` its meta-test domains. MLDG minimises

    L(w) = L_tr(w) + beta * L_te(w - alpha * grad L_tr(w)),

with ``L_tr``/``L_te`` the mean loss over the meta-train/meta-test minibatches. The virtual step
is ``maml.adapt`` with the pooled meta-train minibatches as one task's support set, so the
gradient of ``L_te`` goes through it exactly (second order, as the paper's gradient
``F'(w) + beta * G'(w - alpha F'(w)) (I - alpha F''(w))``), or first order with
``first_order=True``. ERM minimises the mean loss over all minibatches. The network sees each
step's pooled minibatches as one batch (batch norm: their joint statistics), as DomainBed's ERM.

Example::

    init, apply = nets.conv4(10, channels=64)
    state = mldg.init_state(init(0))
    step = mldg.make_train_step(apply, "mldg", inner_lr=0.1, beta=1.0)
    state, metrics = step(state, sampler.batch(0))          # metrics: loss, accuracy
"""

import numpy as np
import tensorflow as tf

from functional_meta import maml, metrics, optim

ALGORITHMS = ("mldg", "erm")


def init_state(weights):
    """Training state ``{'weights', 'opt'}`` of plain tensors (Adam, ``optim``)."""
    weights = list(weights)
    return {"weights": weights, "opt": optim.adam_init(weights)}


def pooled(x, y):
    """Minibatches ``x [D, n, ...]``, ``y [D, n, ...]`` as one task ``[1, D*n, ...]``."""
    return tuple(tf.reshape(t, [1, -1] + t.shape[2:].as_list()) for t in (x, y))


def erm_loss(apply_fn, weights, batch, loss="cross_entropy"):
    """Mean loss over every domain's minibatch: ``(loss, outputs [1, D*n, ...], labels
    [1, D*n])``."""
    x, y = pooled(*batch)
    outputs = apply_fn(weights, x)
    return tf.reduce_mean(maml.loss_function(loss)(outputs, y)), outputs, y


def mldg_loss(apply_fn, weights, batch, *, inner_lr, beta=1.0, meta_test=1, loss="cross_entropy",
              first_order=False):
    """``L_tr(w) + beta * L_te(w - inner_lr * grad L_tr(w))`` (the module docstring):
    ``(loss, meta-train outputs, meta-train labels)``. The last ``meta_test`` domains of the
    batch are meta-test; ``first_order`` drops the virtual step's second derivatives."""
    x, y = batch
    domains = x.shape[0]
    if not 1 <= meta_test < domains:
        raise ValueError(f"meta_test={meta_test} must be between 1 and the number of training "
                         f"domains minus one ({domains - 1}): MLDG needs both splits")
    loss_fn = maml.loss_function(loss)
    split = domains - meta_test
    train_x, train_y = pooled(x[:split], y[:split])
    test_x, test_y = pooled(x[split:], y[split:])
    outputs = apply_fn(weights, train_x)
    train_loss = tf.reduce_mean(loss_fn(outputs, train_y))
    virtual = maml.adapt(apply_fn, weights, train_x, train_y, inner_lr, 1, loss_fn, first_order)
    test_loss = tf.reduce_mean(loss_fn(apply_fn(virtual, test_x), test_y))
    return train_loss + beta * test_loss, outputs, train_y


def objective(apply_fn, algorithm, **options):
    """``objective(weights, batch) -> (loss, outputs, labels)`` of ``'mldg'`` (options of
    ``mldg_loss``) or ``'erm'`` (only ``loss``)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {list(ALGORITHMS)}, got {algorithm!r}")
    if algorithm == "erm":
        unused = sorted(set(options) - {"loss"})
        if unused:
            raise ValueError(f"ERM takes no {unused} (MLDG options)")
        return lambda weights, batch: erm_loss(apply_fn, weights, batch, **options)
    return lambda weights, batch: mldg_loss(apply_fn, weights, batch, **options)


def gradients(apply_fn, weights, batch, algorithm="mldg", **options):
    """The objective and its exact gradient with respect to ``weights``."""
    with tf.GradientTape() as tape:
        tape.watch(weights)
        value, _, _ = objective(apply_fn, algorithm, **options)(weights, batch)
    return value, tape.gradient(value, weights)


def make_train_step(apply_fn, algorithm="mldg", *, lr=1e-3, jit_compile=True, **options):
    """The whole training step, objective, gradient and Adam update, as one
    ``tf.function(jit_compile=...)``: ``step(state, batch) -> (state, {'loss', 'accuracy'})``
    (accuracy on the meta-train minibatches for MLDG, all of them for ERM; ``lr`` a number or an
    ``optim`` schedule)."""
    fn = objective(apply_fn, algorithm, **options)
    classify = options.get("loss", "cross_entropy") == "cross_entropy"

    @tf.function(jit_compile=jit_compile, autograph=False)
    def step(state, batch):
        weights = list(state["weights"])
        with tf.GradientTape() as tape:
            tape.watch(weights)
            value, outputs, labels = fn(weights, batch)
        grads = tape.gradient(value, weights)
        new, opt = optim.adam_update(grads, weights, state["opt"], lr)
        result = {"loss": value}
        if classify:
            result["accuracy"] = maml.accuracy(outputs, labels, value.dtype)
        return {"weights": new, "opt": opt}, result

    return step


def make_eval_step(apply_fn, jit_compile=True):
    """``hits(weights, x [n, ...], y [n]) -> [n]`` 1.0 where the argmax class is ``y``."""

    @tf.function(jit_compile=jit_compile, autograph=False)
    def hits(weights, x, y):
        predicted = tf.argmax(apply_fn(weights, x[None])[0], -1, output_type=y.dtype)
        return tf.cast(tf.equal(predicted, y), weights[0].dtype)

    return hits


def evaluate(hits, weights, x, y, batch_size=500, seed=0):
    """Accuracy over all of ``x [N, ...]``, ``y [N]`` with its 95% interval over images:
    ``{'accuracy', 'accuracy_ci95'}``. The images go through in a fixed random order (``seed``),
    ``batch_size`` at a time, so each batch's batch-norm statistics mix classes; ``hits`` is
    ``make_eval_step``'s function."""
    x, y = np.asarray(x), np.asarray(y)
    order = np.random.default_rng(seed).permutation(len(y))
    values = [np.asarray(hits(weights, x[idx], y[idx]))
              for idx in np.array_split(order, max(1, -(-len(y) // batch_size)))]
    mean, ci = metrics.mean_confidence_interval(np.concatenate(values))
    return {"accuracy": mean, "accuracy_ci95": ci}
