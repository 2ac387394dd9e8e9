"""Implicit MAML against closed forms and against the exact unrolled meta-gradient."""

import numpy as np
import pytest
import tensorflow as tf

from functional_meta import imaml, maml, nets
from test_maml import NETS, image_tasks, regression_tasks

F64 = tf.float64


def augmented(x):
    return np.concatenate([x, np.ones(x.shape[:-1] + (1,))], -1)


def test_conjugate_gradient_solves_each_tasks_system():
    rng = np.random.default_rng(0)
    mats = [m @ m.T + np.eye(5) for m in rng.normal(size=(3, 5, 5))]     # one SPD matrix a task
    b = rng.normal(size=(3, 5))
    matvec = lambda v: [tf.einsum("tij,tj->ti", tf.constant(np.stack(mats)), v[0])]
    x = imaml.conjugate_gradient(matvec, [tf.constant(b)], steps=5)[0].numpy()
    for t in range(3):
        np.testing.assert_allclose(x[t], np.linalg.solve(mats[t], b[t]), rtol=1e-9, atol=1e-11)


def test_linear_least_squares_matches_closed_form():
    # Quadratic support loss: the proximal problem's solution is analytic, and so is the implicit
    # meta-gradient mean_i (I + H_i/lam)^-1 grad Lq_i(w_i).
    rng = np.random.default_rng(1)
    tasks = regression_tasks(rng)
    _, apply = nets.mlp([3, 1])
    weights = [tf.constant(rng.normal(size=(3, 1))), tf.constant(rng.normal(size=(1,)))]
    lam, lr = 1.5, 0.1
    _, grads, _ = tf.function(lambda w: imaml.meta_gradients(
        apply, w, tasks, inner_lr=lr, inner_steps=400, lam=lam, cg_steps=8, loss="mse"))(weights)
    adapted = tf.function(lambda w: imaml.proximal_adapt(
        apply, w, tasks[0], tasks[1], inner_lr=lr, inner_steps=400, lam=lam, loss="mse"))(weights)
    theta = np.concatenate([weights[0].numpy(), weights[1].numpy()[:, None]])
    want = 0
    for i, (sx, sy, qx, qy) in enumerate(zip(*(t.numpy() for t in tasks))):
        xs, xq = augmented(sx), augmented(qx)
        h = 2.0 / len(xs) * xs.T @ xs
        solution = np.linalg.solve(h + lam * np.eye(4), 2.0 / len(xs) * xs.T @ sy + lam * theta)
        got = np.concatenate([adapted[0][i].numpy(), adapted[1][i].numpy()[:, None]])
        np.testing.assert_allclose(got, solution, rtol=1e-10, atol=1e-12)
        query_grad = 2.0 / len(xq) * xq.T @ (xq @ solution - qy)
        want = want + np.linalg.solve(np.eye(4) + h / lam, query_grad) / len(tasks[0])
    got = np.concatenate([grads[0].numpy(), grads[1].numpy()[:, None]])
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def cosine_and_error(a, b):
    a = np.concatenate([np.ravel(x) for x in a])
    b = np.concatenate([np.ravel(x) for x in b])
    return a @ b / np.linalg.norm(a) / np.linalg.norm(b), np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.slow
def test_implicit_gradient_approaches_the_unrolled_one_as_the_inner_problem_converges():
    # A nonlinear net: the implicit gradient is exact only at the inner problem's solution; the
    # exact gradient through the unrolled proximal steps must approach it as the steps grow.
    init, apply = NETS["mlp"]()
    weights, tasks = init(0, F64), image_tasks(np.random.default_rng(2))
    kw = dict(inner_lr=0.2, lam=2.0)
    errors = []
    for steps in (2, 8, 40):
        _, implicit, _ = imaml.meta_gradients(apply, weights, tasks, inner_steps=steps,
                                              cg_steps=30, **kw)
        _, unrolled = imaml.unrolled_meta_gradients(apply, weights, tasks, inner_steps=steps, **kw)
        errors.append(cosine_and_error(implicit, unrolled))
    assert errors[0][1] > errors[1][1] > errors[2][1], errors
    assert errors[2][0] > 1 - 1e-6 and errors[2][1] < 1e-3, errors


@pytest.mark.slow
def test_train_step_learns_and_task_chunks_give_the_same_step():
    init, apply = NETS["conv4"]()
    tasks = image_tasks(np.random.default_rng(3), t=4)
    state = maml.init_state(init(0, F64), inner_lr=0.3)
    kw = dict(inner_steps=3, lam=2.0, cg_steps=4, outer_lr=1e-2, jit_compile=False)
    whole = imaml.make_train_step(apply, **kw)
    chunked = imaml.make_train_step(apply, task_chunk=2, **kw)
    a, b = whole(state, tasks), chunked(state, tasks)
    np.testing.assert_allclose(a[1]["loss"], b[1]["loss"], rtol=1e-12)
    for x, y in zip(tf.nest.flatten(a[0]), tf.nest.flatten(b[0])):
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)
    losses = []
    for _ in range(8):
        state, metrics = whole(state, tasks)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="lam"):
        imaml.make_train_step(apply, inner_steps=3, lam=0.0, cg_steps=4)
    with pytest.raises(ValueError, match="cg_steps"):
        imaml.make_train_step(apply, inner_steps=3, lam=1.0, cg_steps=0)


def test_learner_trains_evaluates_and_resumes_exactly(tmp_path):
    # --algorithm=imaml through training.make_learner: config fields, evaluation with the
    # proximal adaptation, and a resumed run equal to an uninterrupted one.
    from functional_meta import configs, training
    config = configs.make_config("imaml", data="sinusoid", hidden=[8], meta_batch=2,
                                 inner_steps=2, test_inner_steps=2, inner_lr=0.05,
                                 proximal_lambda=1.0, cg_steps=2)
    assert (config["proximal_lambda"], config["cg_steps"]) == (1.0, 2)
    learner = training.make_learner(config, jit_compile=False)
    sampler = lambda: training.make_sampler(None, n_way=1, k_shot=5, q_query=5, meta_batch=2,
                                            seed=0)
    common = dict(log_every=1, checkpoint_every=2, summaries=False, on_progress=lambda r: None)
    whole = training.train(learner, sampler(), out_dir=tmp_path / "whole", steps=4, **common)
    training.train(learner, sampler(), out_dir=tmp_path / "resumed", steps=2, **common)
    resumed = training.train(learner, sampler(), out_dir=tmp_path / "resumed", steps=4,
                             resume=True, **common)
    np.testing.assert_allclose(resumed.losses, whole.losses[2:], rtol=1e-6)
    evaluator = training.make_evaluator(config, learner.apply, jit_compile=False)
    state = learner.init(0)
    result = training.evaluate(evaluator, state, sampler(), 4)
    assert np.isfinite(result["mse"])
    with pytest.raises(ValueError, match="apply to algorithm='imaml' only"):
        configs.make_config("maml", data="sinusoid", cg_steps=3)
    with pytest.raises(ValueError, match="proximal_lambda must be a positive"):
        configs.make_config("imaml", data="sinusoid", proximal_lambda=-1.0)


@pytest.mark.slow
def test_study_binary_compares_implicit_and_exact_meta_gradients(tmp_path):
    import json
    import subprocess
    import sys
    out = tmp_path / "study.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.maml_study", "--study=imaml", "--preset=maml_sinusoid",
         "--data=sinusoid", "--hidden=8", "--meta_batch=4", "--train_steps=3", "--log_every=2",
         "--inner_steps=5", "--inner_lr=0.05", "--cg_steps=10", "--sweep_inner_steps=1,40",
         f"--output={out}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["step"], r["inner_steps"]) for r in rows] == [(1, 1), (1, 5), (1, 40), (2, 5),
                                                             (3, 1), (3, 5), (3, 40)]
    for step in (1, 3):      # more inner steps: the inner problem nearer its solution
        by_steps = {r["inner_steps"]: r for r in rows if r["step"] == step}
        assert by_steps[40]["relative_error"] < by_steps[1]["relative_error"]
        assert by_steps[40]["cosine"] > 0.99
    assert "cos(implicit, exact)" in proc.stdout
