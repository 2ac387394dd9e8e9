"""The looped inner loop (maml._looped_steps) against TensorFlow's gradient of the unrolled steps,
finite differences, and the compiled graph's size."""

import re

import numpy as np
import pytest
import tensorflow as tf

from functional_meta import maml, nets
from test_maml import NETS, directional_check, image_tasks

F64 = tf.float64


def rates(weights, mode, steps, seed=0):
    """Learnable inner rates of ``mode`` moved off their initial value, so that each entry (and,
    for LSLR, each step) differs."""
    lrs = maml.init_inner_lrs(weights, 0.3, mode, steps)
    flat = tf.nest.flatten(lrs)
    moved = [r * 0.5 + 0.2 * tf.random.stateless_uniform(r.shape, [seed, i], dtype=r.dtype)
             for i, r in enumerate(flat)]
    return tf.nest.pack_sequence_as(lrs, moved)


def loss_and_gradients(apply, weights, lrs, tasks, steps, msl, inner_loop, first_order=False):
    """The meta-loss and its gradient with respect to the weights and every learnable rate."""
    learned = tf.nest.flatten(lrs)
    with tf.GradientTape() as tape:
        tape.watch([weights, learned])
        value, _ = maml.meta_loss(apply, weights, tasks, inner_lr=lrs, inner_steps=steps,
                                  step_weights=[1.0 / steps] * steps if msl else None,
                                  inner_loop=inner_loop, first_order=first_order)
    grads = tape.gradient(value, [weights, learned])
    return [value] + tf.nest.flatten(grads)


def assert_same(got, want, rtol=1e-10):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        a, b = np.asarray(a), np.asarray(b)
        scale = max(np.max(np.abs(b)), 1e-12)
        np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("steps", [1, 3, 10])
@pytest.mark.parametrize("mode", ["fixed", "metasgd", "lslr"])
@pytest.mark.parametrize("msl", [False, True])
def test_looped_meta_gradient_equals_unrolled(steps, mode, msl):
    # Float64, eager: the loop's gradient recursion (HVPs at the stored weights, the rates'
    # gradients, the multi-step loss's query gradients) against TensorFlow's unrolled gradient.
    init, apply = NETS["mlp"]()
    weights, tasks = init(0, F64), image_tasks(np.random.default_rng(steps))
    lrs = rates(weights, mode, steps)
    want = loss_and_gradients(apply, weights, lrs, tasks, steps, msl, "unrolled")
    got = loss_and_gradients(apply, weights, lrs, tasks, steps, msl, "looped")
    assert_same(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("mode, msl, steps", [("fixed", False, 10), ("lslr", True, 3),
                                              ("metasgd", True, 3)])
def test_compiled_looped_meta_gradient_equals_unrolled_on_conv4(mode, msl, steps):
    # Under XLA the loops' bodies take nets' XLA-only forms (wide kernel gradients behind a
    # barrier) and their second derivatives inside a while loop; the eager unrolled gradient is
    # the reference.
    init, apply = NETS["conv4"]()
    weights, tasks = init(0, F64), image_tasks(np.random.default_rng(7))
    lrs = rates(weights, mode, steps)
    want = loss_and_gradients(apply, weights, lrs, tasks, steps, msl, "unrolled")
    compiled = tf.function(lambda w, r: loss_and_gradients(apply, w, r, tasks, steps, msl,
                                                           "looped"),
                           jit_compile=True, autograph=False)
    assert_same(compiled(weights, lrs), want)


def test_looped_first_order_equals_unrolled():
    # FOMAML: no Hessian terms, but the learned rates still get -<v, g_t>.
    init, apply = NETS["conv4"]()
    weights, tasks = init(1, F64), image_tasks(np.random.default_rng(8))
    lrs = rates(weights, "lslr", 3)
    want = loss_and_gradients(apply, weights, lrs, tasks, 3, True, "unrolled", first_order=True)
    got = loss_and_gradients(apply, weights, lrs, tasks, 3, True, "looped", first_order=True)
    assert_same(got, want)


def test_compiled_looped_meta_gradient_matches_finite_differences():
    init, apply = NETS["conv4"]()
    weights, tasks = init(0, F64), image_tasks(np.random.default_rng(9))
    kw = dict(inner_lr=0.3, inner_steps=4, inner_loop="looped")
    _, grads = tf.function(lambda w: maml.meta_gradients(apply, w, tasks, **kw),
                           jit_compile=True, autograph=False)(weights)
    directional_check(lambda w: float(maml.meta_loss(apply, w, tasks, **kw)[0]), grads, weights,
                      np.random.default_rng(0))


def test_looped_adapt_and_eval_step_equal_unrolled():
    init, apply = NETS["conv4"]()
    weights, tasks = init(2, F64), image_tasks(np.random.default_rng(10))
    lr = tf.constant(0.3, F64)
    results = []
    for inner_loop in ("unrolled", "looped"):
        evaluate = maml.make_eval_step(apply, inner_steps=5, inner_loop=inner_loop)
        adapted = maml.adapt(apply, weights, tasks[0], tasks[1], lr, 5, inner_loop=inner_loop)
        results.append(list(evaluate(weights, lr, tasks)) + adapted)
    assert_same(results[1], results[0], rtol=1e-12)


def test_auto_loops_from_the_measured_threshold():
    assert not maml.loops("auto", maml.LOOP_FROM - 1) and maml.loops("auto", maml.LOOP_FROM)
    assert not maml.loops("looped", 1) and maml.loops("looped", 2)
    assert not maml.loops("unrolled", 50)
    with pytest.raises(ValueError, match="inner_loop must be one of"):
        maml.make_train_step(lambda w, x: x, inner_steps=2, inner_loop="scan")


def hlo_instructions(inner_steps, inner_loop):
    """Instructions of the (unoptimised) HLO of a tiny conv4's train step."""
    init, apply = nets.conv4(n_way=3, channels=4, in_shape=(8, 8, 1), blocks=2)
    step = maml.make_train_step(apply, inner_steps=inner_steps, inner_loop=inner_loop)
    state = maml.init_state(init(0), inner_lr=0.3)
    tasks = tuple(tf.cast(t, tf.float32) if t.dtype == F64 else t
                  for t in image_tasks(np.random.default_rng(0)))
    hlo = step.experimental_get_compiler_ir(state, tasks)(stage="hlo")
    return len(re.findall(r"^\s+(?:ROOT )?%?[\w.-]+ = ", hlo, flags=re.M))


def test_compiled_graph_does_not_grow_with_inner_steps():
    looped = [hlo_instructions(steps, "looped") for steps in (2, 20)]
    assert looped[0] == looped[1], looped
    unrolled = [hlo_instructions(steps, "unrolled") for steps in (2, 4)]
    assert unrolled[1] > 1.5 * unrolled[0], unrolled     # the count can tell them apart
