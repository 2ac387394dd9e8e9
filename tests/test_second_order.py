import numpy as np
import pytest
import tensorflow as tf

from functional_meta import nets, second_order


def linear_tasks(rng, t=3, n=6, d=3):
    return tuple(tf.constant(a) for a in (
        rng.normal(size=(t, n, d)), rng.normal(size=(t, n, 1)),
        rng.normal(size=(t, n, d)), rng.normal(size=(t, n, 1))))


def augmented(x):
    return np.concatenate([x, np.ones(x.shape[:-1] + (1,))], -1)


def test_support_hvp_equals_closed_form_hessian_product():
    rng = np.random.default_rng(0)
    sx, sy, _, _ = linear_tasks(rng)
    _, apply = nets.mlp([3, 1])
    weights = [tf.constant(rng.normal(size=(3, 1))), tf.constant(rng.normal(size=(1,)))]
    vector = [tf.constant(rng.normal(size=(3, 1))), tf.constant(rng.normal(size=(1,)))]
    hv = second_order.support_hvp(apply, weights, sx, sy, vector, loss="mse")
    xs = augmented(sx.numpy())
    hessian = sum(2.0 / len(x) * x.T @ x for x in xs)  # summed over tasks
    want = hessian @ np.concatenate([vector[0].numpy(), vector[1].numpy()[:, None]])
    got = np.concatenate([hv[0].numpy(), hv[1].numpy()[:, None]])
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_correction_is_the_hessian_term_for_one_linear_step():
    # One step: exact = (I - a H_s) g_q, first order = g_q, so correction = -a H_s g_q per task.
    rng = np.random.default_rng(1)
    tasks = linear_tasks(rng)
    _, apply = nets.mlp([3, 1])
    weights = [tf.constant(rng.normal(size=(3, 1))), tf.constant(rng.normal(size=(1,)))]
    out = second_order.split(apply, weights, tasks, inner_lr=0.1, inner_steps=1, loss="mse")
    theta = np.concatenate([weights[0].numpy(), weights[1].numpy()[:, None]])
    want = 0
    for s_x, s_y, q_x, q_y in zip(*(augmented(a.numpy()) if i % 2 == 0 else a.numpy()
                                      for i, a in enumerate(tasks))):
        h = 2.0 / len(s_x) * s_x.T @ s_x
        adapted = theta - 0.1 * 2.0 / len(s_x) * s_x.T @ (s_x @ theta - s_y)
        g_q = 2.0 / len(q_x) * q_x.T @ (q_x @ adapted - q_y)
        want = want - 0.1 * h @ g_q / len(tasks[0])
    got = np.concatenate([out["correction"][0].numpy(), out["correction"][1].numpy()[:, None]])
    np.testing.assert_allclose(got, want, rtol=1e-10)
    total = np.sqrt(sum(float(tf.reduce_sum(c ** 2)) for c in out["correction"]))
    np.testing.assert_allclose(float(out["norm_correction_total"]), total, rtol=1e-12)
    assert float(out["cosine_total"]) < 1.0


def test_zero_hessian_gives_zero_correction_and_cosine_one():
    rng = np.random.default_rng(2)
    tasks = linear_tasks(rng)
    _, apply = nets.mlp([3, 1])
    weights = [tf.constant(rng.normal(size=(3, 1))), tf.constant(rng.normal(size=(1,)))]
    linear_loss = lambda out, y: tf.reduce_mean(out * y, axis=[-2, -1])
    out = second_order.split(apply, weights, tasks, inner_lr=0.5, inner_steps=2, loss=linear_loss)
    assert float(out["norm_correction_total"]) < 1e-12
    np.testing.assert_allclose([float(c) for c in out["cosine"]], 1.0, rtol=1e-12)


@pytest.mark.slow
def test_study_binary_logs_the_split(tmp_path):
    import json
    import subprocess
    import sys
    out = tmp_path / "study.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.maml_study", "--preset=maml_sinusoid", "--data=sinusoid",
         "--hidden=8", "--meta_batch=4", "--train_steps=3", "--log_every=2", f"--output={out}"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert len(r["cosine"]) == 4 and -1.0 <= r["cosine_total"] <= 1.0 + 1e-6
        assert r["norm_correction_total"] > 0 and r["curvature"] == r["curvature"]
        assert r["norm_exact_total"] <= r["norm_first_order_total"] + r["norm_correction_total"] + 1e-6
    assert "cos(first-order, exact)" in proc.stdout
