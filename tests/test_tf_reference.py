"""The straightforward TensorFlow MAML step (benchmarks/tf_reference.py) computes the library's
meta-gradient: float64 agreement of its loop over tasks with ``maml.meta_gradients``, its float32
fused batch norm exact in second order, and the binary's output and flag checks."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from benchmarks import tf_reference as ref
from functional_meta import maml, nets


def episodes(rng, t, n, k, q, size):
    sx, qx = rng.normal(size=(t, n * k, size, size, 1)), rng.normal(size=(t, n * q, size, size, 1))
    sy = np.stack([rng.permutation(np.repeat(np.arange(n), k)) for _ in range(t)])
    qy = np.stack([rng.permutation(np.repeat(np.arange(n), q)) for _ in range(t)])
    return sx, sy, qx, qy


@pytest.mark.parametrize("pool, size, inner_steps", [("stride", 9, 1), ("stride", 9, 2),
                                                     ("max", 16, 1)])
def test_meta_gradient_matches_library(pool, size, inner_steps):
    # 9x9 with stride-2 blocks (9 -> 5 -> 3 -> 2 -> 1) takes both even and odd 'SAME' pads.
    init, apply = nets.conv4(3, channels=4, in_shape=(size, size, 1), pool=pool)
    weights = init(seed=1, dtype=tf.float64)
    tasks = episodes(np.random.default_rng(0), 2, 3, 2, 2, size)
    loss, grads = maml.meta_gradients(apply, weights, tasks, inner_lr=0.3, inner_steps=inner_steps)
    ref_loss, ref_grads = ref.meta_gradients(weights, tuple(map(tf.constant, tasks)), 0.3,
                                             inner_steps, pool)
    np.testing.assert_allclose(float(ref_loss), float(loss), rtol=1e-12)
    for a, b in zip(ref_grads, grads):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12)


def test_fused_batch_norm_is_exact_in_second_order():
    # float32 through TensorFlow's fused batch-norm kernel against the library in float64: errors
    # of float32 rounding (about 1e-6 of each gradient's largest entry); a dropped second-order
    # term of that kernel would be of the gradient's own size.
    init, apply = nets.conv4(3, channels=8, in_shape=(28, 28, 1), pool="stride")
    weights = init(seed=2, dtype=tf.float64)
    tasks = episodes(np.random.default_rng(1), 2, 3, 1, 1, 28)
    loss, grads = maml.meta_gradients(apply, weights, tasks, inner_lr=0.4, inner_steps=1)
    single = tuple(tf.constant(a.astype(np.float32) if a.dtype == np.float64 else a) for a in tasks)
    ref_loss, ref_grads = ref.meta_gradients([tf.cast(w, tf.float32) for w in weights], single,
                                             0.4, 1)
    np.testing.assert_allclose(float(ref_loss), float(loss), rtol=1e-5)
    for a, b in zip(ref_grads, grads):
        assert np.abs(a.numpy() - b.numpy()).max() < 1e-4 * np.abs(b.numpy()).max()


def run_binary(*args):
    return subprocess.run([sys.executable, "-m", "benchmarks.tf_reference", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["xla", "eager"])
def test_binary_reports_a_json_line(mode):
    result = run_binary("--meta_batch=2", "--steps=2", f"--mode={mode}", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["config"]["meta_batch"] == 2 and record["mode"] == mode
    assert record["tasks_per_s"] == pytest.approx(2 / record["step_s"]["median"])
    assert np.isfinite(record["loss"])
    assert "throughput" in result.stdout


@pytest.mark.slow
def test_binary_interleaves_the_library_step():
    result = run_binary("--meta_batch=2", "--steps=1", "--interleaved", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    library = record["library"]
    # Same batch, same initial weights, one Adam update each: the same loss to float32 noise.
    assert library["loss"] == pytest.approx(record["loss"], rel=1e-4)
    assert record["speedup"] == pytest.approx(record["step_s"]["median"] / library["step_s"]["median"])
    assert library["tasks_per_s"] == pytest.approx(2 / library["step_s"]["median"])
    assert "speedup" in result.stdout and "functional_meta's step" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--interleaved", "--mode=eager"], "--interleaved"),
    (["--interleaved", "--profile_dir=/tmp/unused"], "--interleaved"),
    (["--preset=protonet_omniglot"], "--preset"),
    (["--preset=maml_sinusoid"], "--preset"),
    (["--meta_batch=0"], "--meta_batch"),
    (["--mode=jit"], "--mode"),
])
def test_binary_rejects_bad_flags(args, message):
    result = run_binary(*args)
    assert result.returncode != 0
    assert message in result.stderr
