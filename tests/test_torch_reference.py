"""The PyTorch reference step (benchmarks/torch_reference.py) computes the library's functions:
float64 agreement of MAML's second-order meta-gradient (PyTorch's ``create_graph`` loop over
tasks against ``maml.meta_gradients``) and of ProtoNet's loss and gradient, and the binary's
output and flag checks. An independent implementation in another framework agreeing to 1e-10 is
also a check of the library's exactness."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from functional_meta import maml, nets, protonet

torch = pytest.importorskip("torch", reason="PyTorch is not installed: pip install -e '.[reference]'")
from benchmarks import torch_reference as ref  # noqa: E402  (needs torch)


def to_nchw(x):
    return torch.from_numpy(np.moveaxis(x, -1, -3).copy())


def to_library(grads):
    """Torch gradients back to the library's layouts (kernels HWIO, head [D, n])."""
    out = []
    for g in grads:
        g = g.detach().numpy()
        out.append(g.transpose(2, 3, 1, 0) if g.ndim == 4 else g.T if g.ndim == 2 else g)
    return out


def assert_close(ours, theirs):
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_maml_meta_gradient_matches_library(inner_steps):
    # 9x9 input with stride-2 blocks: 9 -> 5 -> 3 -> 2 -> 1 takes both even and odd 'SAME' pads.
    rng = np.random.default_rng(0)
    t, n, k, q = 2, 3, 2, 2
    init, apply = nets.conv4(n, channels=4, in_shape=(9, 9, 1), pool="stride")
    weights = init(seed=1, dtype=tf.float64)
    sx, qx = rng.normal(size=(t, n * k, 9, 9, 1)), rng.normal(size=(t, n * q, 9, 9, 1))
    sy = np.stack([rng.permutation(np.repeat(np.arange(n), k)) for _ in range(t)])
    qy = np.stack([rng.permutation(np.repeat(np.arange(n), q)) for _ in range(t)])
    loss, grads = maml.meta_gradients(apply, weights, (sx, sy, qx, qy), inner_lr=0.3,
                                      inner_steps=inner_steps)
    params = ref.from_library_weights(weights)
    assert params[0].dtype == torch.float64
    t_loss, t_grads = ref.maml_meta_gradients(
        params, (to_nchw(sx), torch.from_numpy(sy).long(), to_nchw(qx), torch.from_numpy(qy).long()),
        0.3, inner_steps, pool="stride")
    np.testing.assert_allclose(float(loss), float(t_loss.detach()), rtol=1e-12)
    assert_close(grads, to_library(t_grads))


def test_protonet_loss_and_gradient_match_library():
    rng = np.random.default_rng(1)
    n, k, q = 3, 2, 3
    init, apply = nets.conv4(None, channels=4, in_shape=(16, 16, 1), pool="max")
    weights = init(seed=2, dtype=tf.float64)
    sx, qx = rng.normal(size=(1, n * k, 16, 16, 1)), rng.normal(size=(1, n * q, 16, 16, 1))
    sy = rng.permutation(np.repeat(np.arange(n), k))[None]
    qy = rng.permutation(np.repeat(np.arange(n), q))[None]
    with tf.GradientTape() as tape:
        tape.watch(weights)
        loss, _ = protonet.loss_and_logits(apply, weights, (sx, sy, qx, qy), n)
    grads = tape.gradient(loss, weights)
    params = ref.from_library_weights(weights)
    t_loss = ref.protonet_loss(params, (to_nchw(sx[0]), torch.from_numpy(sy[0]).long(),
                                        to_nchw(qx[0]), torch.from_numpy(qy[0]).long()), n)
    t_grads = torch.autograd.grad(t_loss, params)
    np.testing.assert_allclose(float(loss), float(t_loss.detach()), rtol=1e-12)
    assert_close(grads, to_library(t_grads))


def run_binary(*args):
    return subprocess.run([sys.executable, "-m", "benchmarks.torch_reference", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_binary_reports_a_json_line():
    result = run_binary("--preset=maml_omniglot_5way", "--meta_batch=2", "--steps=2", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["config"]["meta_batch"] == 2 and record["steps"] == 2
    assert record["tasks_per_s"] == pytest.approx(2 / record["step_s"]["median"])
    assert np.isfinite(record["loss"])
    assert "throughput" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--preset=protonet_omniglot", "--inner_steps=2"], "--inner_steps"),
    (["--preset=maml_sinusoid"], "--preset"),
    (["--meta_batch=0"], "--meta_batch"),
])
def test_binary_rejects_bad_flags(args, message):
    result = run_binary(*args)
    assert result.returncode != 0
    assert message in result.stderr
