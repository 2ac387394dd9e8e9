"""Data-parallel meta-training: two replicas (two logical CPUs, or two worker processes on
localhost) must give the single-device meta-gradient and weights on the same meta-batch.

Logical devices and the multi-worker runtime must be set up before TensorFlow initialises, so the
distributed runs happen in fresh processes (``tests/_distribute_worker.py``), all started at once
so that they overlap with each other and with the single-device references computed here.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from functional_meta import distribute, maml, protonet

HERE = Path(__file__).resolve().parent
WORKER_SCRIPT = HERE / "_distribute_worker.py"
TIMEOUT_S = 300


def _load_worker_module():
    spec = importlib.util.spec_from_file_location("_distribute_worker", WORKER_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


W = _load_worker_module()


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", **extra)
    return env


def _run(args, env, log_path):
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, str(WORKER_SCRIPT), *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=HERE.parent)


def _free_ports(count):
    ports = set()
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            ports.add(s.getsockname()[1])
    return sorted(ports)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Starts the mirrored run and the two workers; yields ``({name: (process, log, out)}, dir)``
    and kills whatever still runs at the end."""
    tmp = tmp_path_factory.mktemp("distribute")
    runs = {}
    try:
        log, out = tmp / "mirrored.log", tmp / "mirrored.npz"
        runs["mirrored"] = (_run(["mirrored", str(out)], _env(), log), log, out)
        cluster = [f"localhost:{port}" for port in _free_ports(2)]      # loopback only
        for index in range(2):
            config = json.dumps({"cluster": {"worker": cluster},
                                 "task": {"type": "worker", "index": index}})
            log, out = tmp / f"worker{index}.log", tmp / f"worker{index}.npz"
            runs[f"worker{index}"] = (
                _run(["multiworker", str(out), str(tmp / "checkpoints")],
                     _env(TF_CONFIG=config), log), log, out)
        yield runs, tmp
    finally:
        for process, _, _ in runs.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def _results(launched, *names):
    """Waits for the named runs (killing every run on a timeout), checks their exit status and
    loads their results."""
    runs, _ = launched
    try:
        for name in names:
            runs[name][0].wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for process, _, _ in runs.values():
            process.kill()
        raise
    results = []
    for name in names:
        process, log, out = runs[name]
        assert process.returncode == 0, \
            f"{name} exited {process.returncode}:\n{log.read_text()[-4000:]}"
        with np.load(out) as f:
            results.append(dict(f))
    return results


def _single_device_step(algorithm, options, apply):
    if algorithm == "maml":
        return maml.make_train_step(apply, jit_compile=False, **options)
    return protonet.make_train_step(apply, jit_compile=False, **options)


@pytest.fixture(scope="module")
def reference(launched):
    """Single-device results on the same meta-batches: final states, and MAML's first
    meta-gradient (computed while the distributed runs are under way)."""
    results = {}
    for name, (algorithm, options, (_, apply), state, steps) in W.problems().items():
        step = _single_device_step(algorithm, options, apply)
        tensors = [tuple(tf.constant(a) for a in tasks) for tasks in steps]
        results[name] = W.flat(W.train(step, state, tensors))
        if name == "maml":
            loss, grads = maml.meta_gradients(apply, state["weights"], tensors[0], inner_lr=0.4,
                                              inner_steps=options["inner_steps"])
            results["maml_loss"] = np.asarray(loss)
            results["maml_grads"] = [np.asarray(g) for g in grads]
    return results


@pytest.fixture(scope="module")
def mirrored(launched, reference):
    return _results(launched, "mirrored")[0]


def _state(results, prefix):
    count = len([k for k in results if k.startswith(prefix)])
    return [results[f"{prefix}{i}"] for i in range(count)]


def _assert_states_close(got, want, what):
    assert len(got) == len(want) > 0, what
    for i, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=f"{what}, entry {i}")


@pytest.mark.slow
def test_mirrored_runs_two_replicas(mirrored):
    assert mirrored["num_replicas"] == 2


@pytest.mark.slow
def test_mirrored_maml_meta_gradient_equals_single_device(mirrored, reference):
    np.testing.assert_allclose(mirrored["maml_loss"], reference["maml_loss"], rtol=1e-6)
    _assert_states_close(_state(mirrored, "maml_grad_"), reference["maml_grads"], "meta-gradient")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["maml", "protonet", "linear"])
def test_mirrored_three_steps_equal_single_device(mirrored, reference, name):
    """``linear`` runs with ``jit_compile=True``: XLA gradient and update around the all-reduce."""
    replica0 = _state(mirrored, f"{name}_replica0_")
    replica1 = _state(mirrored, f"{name}_replica1_")
    _assert_states_close(replica0, reference[name], f"{name}: replica 0 vs single device")
    for i, (a, b) in enumerate(zip(replica0, replica1)):
        np.testing.assert_array_equal(a, b, err_msg=f"{name}: replicas differ at entry {i}")


@pytest.mark.slow
def test_mirrored_resume_from_checkpoint(mirrored, reference):
    _assert_states_close(_state(mirrored, "maml_resumed_"), reference["maml"],
                         "two steps, checkpoint, restore, one step")


@pytest.mark.slow
def test_multiworker_two_processes_equal_single_process(launched, reference):
    chief, worker = _results(launched, "worker0", "worker1")
    assert chief["num_replicas"] == worker["num_replicas"] == 2
    assert chief["is_chief"] and not worker["is_chief"]
    assert chief["shard_size"] == worker["shard_size"] == W.META_BATCH // 2
    assert worker["temporary_dir_removed"] and not chief["temporary_dir_removed"]
    assert (launched[1] / "checkpoints" / "state.npz").exists()
    for i, (a, b) in enumerate(zip(_state(chief, "final_"), _state(worker, "final_"))):
        np.testing.assert_array_equal(a, b, err_msg=f"the workers' states differ at entry {i}")
    _assert_states_close(_state(chief, "final_"), reference["maml"], "worker 0 vs one process")
    for r in (chief, worker):
        _assert_states_close(_state(r, "resumed_"), reference["maml"], "resumed vs one process")


@pytest.mark.slow
def test_meta_batch_not_dividing_replicas_is_a_clear_error(mirrored):
    message = str(mirrored["odd_error"])
    assert "meta_batch=3" in message and "2 replicas" in message, message
    with pytest.raises(ValueError, match=r"meta_batch=6 does not split evenly over 4 replicas"):
        distribute.check_meta_batch(6, 4)
    assert distribute.check_meta_batch(8, 4) == 2


def test_bad_strategy_names_and_missing_tf_config(monkeypatch):
    with pytest.raises(ValueError, match="strategy must be one of"):
        distribute.make_strategy("tpu")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        distribute.make_strategy("multiworker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        distribute.make_strategy("multiworker")


def test_single_worker_shard_is_the_whole_batch_and_chief_writes_in_place(tmp_path):
    strategy = distribute.make_strategy("none")
    sampler = W.sampler()
    shard = distribute.shard_sampler(sampler, strategy)
    assert shard.meta_batch == W.META_BATCH
    for a, b in zip(shard.batch(5), sampler.batch(5)):
        np.testing.assert_array_equal(a, b)
    assert distribute.is_chief(strategy)
    with distribute.checkpoint_directory(strategy, str(tmp_path / "ckpt")) as where:
        assert where == str(tmp_path / "ckpt") and os.path.isdir(where)


def test_wrong_task_count_is_a_clear_error():
    strategy = distribute.make_strategy("none")
    _, _, (_, apply), state, steps = W.problems()["protonet"]
    step = distribute.make_distributed_train_step(strategy, "protonet", apply,
                                                  meta_batch=W.META_BATCH, **W.PROTONET)
    half = tuple(a[:2] for a in steps[0])
    with pytest.raises(ValueError, match=r"tasks hold 2 tasks; expected the global meta_batch=4"):
        step(state, half)
    assert step.tracing_count() == 0


@pytest.mark.slow                 # its reference fixture launches the distributed runs
@pytest.mark.parametrize("name, chunk", [("linear", None), ("maml", 1)])
def test_default_strategy_step_equals_single_device(reference, name, chunk):
    """``--strategy=none``: one replica, the same computation as ``maml.make_train_step``; with a
    ``task_chunk``, the replica loops over chunks and still gives the reference's states."""
    algorithm, options, (_, apply), state, steps = W.problems()[name]
    if chunk is not None:
        options = dict(options, task_chunk=chunk)
    step = distribute.make_distributed_train_step(distribute.make_strategy("none"), algorithm,
                                                  apply, meta_batch=W.META_BATCH,
                                                  jit_compile=False, **options)
    assert step.num_replicas == 1
    steps = [tuple(tf.constant(a) for a in tasks) for tasks in steps]
    _assert_states_close(W.flat(W.train(step, state, steps)), reference[name], "none")


def test_options_are_checked_before_anything_compiles():
    strategy = distribute.make_strategy("none")
    _, _, (_, apply), _, _ = W.problems()["protonet"]
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['outer_lr'\].*'lr'"):
        distribute.make_distributed_train_step(strategy, "protonet", apply, meta_batch=4,
                                               n_way=3, outer_lr=1e-3)
    with pytest.raises(ValueError, match="inner_steps must be a positive integer"):
        distribute.make_distributed_train_step(strategy, "maml", apply, meta_batch=4,
                                               inner_steps=0)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        distribute.make_distributed_train_step(strategy, "reptile", apply, meta_batch=4)
