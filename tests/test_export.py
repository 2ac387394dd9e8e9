"""Exports of a compiled step (functional_meta.export): what is written reads back as the step's
own inputs and outputs; the XLA replay (benchmarks/xla_replay.py, JAX) reproduces TensorFlow's
outputs from the HLO alone; the PyTorch reference started from an export computes TensorFlow's
loss and update; the GPU check's two sides run end to end on this CPU with small shapes.

The replay tests need JAX and the reference tests PyTorch: without them they skip with the reason
(.ci/run installs both and runs this file again)."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from benchmarks import flag_groups, runner
from functional_meta import export, maml, nets, protonet

needs_jax = pytest.mark.skipif(importlib.util.find_spec("jax") is None,
                               reason="JAX is not installed: pip install -e '.[replay]' (.ci/run "
                                      "installs it and runs these)")
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="PyTorch is not installed: pip install -e '.[reference]' "
                                        "(.ci/run installs it and runs these)")
SHAPE = (4, 4, 1)


def small_batch(tasks, n_way, k_shot, q_query, shape=SHAPE, seed=0):
    return runner.synthetic_batch(dict(meta_batch=tasks, n_way=n_way, k_shot=k_shot,
                                       q_query=q_query, image_shape=shape), seed)


@pytest.fixture(scope="module")
def maml_export(tmp_path_factory):
    """A second-order MAML step of a 16-8-3 MLP on 2 tasks, exported, and its pieces."""
    init, apply = nets.mlp([16, 8, 3], in_shape=SHAPE)
    state = maml.init_state(init(seed=0), inner_lr=0.3)
    batch = small_batch(2, 3, 2, 2)
    step = maml.make_train_step(apply, inner_steps=2, outer_lr=0.01)
    path = str(tmp_path_factory.mktemp("maml_export"))
    export.write(path, step, state, batch, config={"family": "maml", "meta_batch": 2})
    return path, step, state, batch


@pytest.fixture(scope="module")
def protonet_export(tmp_path_factory):
    """A ProtoNet step (MLP embedding, 4-way 2-shot, 2 episodes), exported."""
    init, apply = nets.mlp([16, 8, 6], in_shape=SHAPE)
    state = protonet.init_state(init(seed=1))
    step = protonet.make_train_step(apply, n_way=4, lr=0.01, jit_compile=True)
    path = str(tmp_path_factory.mktemp("protonet_export"))
    export.write(path, step, state, small_batch(2, 4, 2, 3, seed=1),
                 config={"family": "protonet", "meta_batch": 2})
    return path


def test_export_reads_back_as_the_steps_inputs_and_outputs(maml_export):
    path, step, state, batch = maml_export
    exp = export.read(path)
    man = exp.manifest
    flat_in = tf.nest.flatten((state, tuple(batch)))
    assert [a["name"] for a in man["args"][:3]] == ["state/inner_lr", "state/opt/0",
                                                    "state/opt/1/0"]
    assert [a["name"] for a in man["args"][-4:]] == [f"batch/{i}" for i in range(4)]
    assert man["args"][1]["dtype"] == "int64"                  # Adam's step count
    for got, want in zip(exp.inputs, flat_in):
        np.testing.assert_array_equal(got, np.asarray(want))
    new_state, metrics = step(state, batch)
    flat_out = tf.nest.flatten((new_state, metrics))
    assert len(exp.outputs) == len(flat_out) == len(man["outputs"])
    for got, want in zip(exp.outputs, flat_out):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-7)
    assert man["outputs"][man["loss_index"]]["name"] == "metrics/loss"
    assert man["loss"] == pytest.approx(float(metrics["loss"]), rel=1e-6)
    assert man["state_outputs"] == len(tf.nest.flatten(new_state))
    assert [o["name"] for o in man["outputs"][:man["state_outputs"]]] == \
        [a["name"] for a in man["args"][:man["state_outputs"]]]    # the state feeds back
    weights = export.named(exp, "state/weights/", exp.outputs)
    np.testing.assert_allclose(weights["state/weights/0"], new_state["weights"][0].numpy(),
                               rtol=1e-6)


def test_export_hlo_variants(maml_export):
    exp = export.read(maml_export[0])
    default, fp32 = (exp.manifest["variants"][v] for v in ("default", "fp32"))
    assert default["dots"] > 0 and default["dots"] == fp32["dots"]
    assert default["dots_highest"] == 0 and fp32["dots_highest"] == fp32["dots"]
    assert default["custom_calls"] == fp32["custom_calls"] == []    # device-neutral
    text = export.hlo(exp, "fp32", form="text")
    assert "ENTRY" in text and text.count("parameter(") >= len(exp.inputs)
    assert export.hlo(exp)[:1] != b""
    with pytest.raises(ValueError, match="variant"):
        export.hlo(exp, "tf32")


def test_write_and_read_refuse_what_they_cannot_export(tmp_path, maml_export):
    init, apply = nets.mlp([16, 3], in_shape=SHAPE)
    state = maml.init_state(init(seed=0))
    plain = maml.make_train_step(apply, inner_steps=1, jit_compile=False)
    with pytest.raises(ValueError, match="jit_compile=True"):
        export.write(str(tmp_path / "plain"), plain, state, small_batch(1, 3, 1, 1))
    with pytest.raises(ValueError, match="tf.function"):
        export.write(str(tmp_path / "python"), lambda s, b: (s, {}), state, ())
    with pytest.raises(ValueError, match="no manifest.json"):
        export.read(str(tmp_path))
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(maml_export[0]):
        (broken / name).write_bytes((open(os.path.join(maml_export[0], name), "rb")).read())
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["args"][0]["shape"] = [7]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"inputs.npz: state/inner_lr is float32\[\]"):
        export.read(str(broken))


def test_flatten_with_names_follows_tf_nest():
    structure = {"b": [1, (2, 3)], "a": {"y": 4, "x": 5}}
    named = export.flatten_with_names(structure, "s")
    assert [leaf for _, leaf in named] == tf.nest.flatten(structure)
    assert [name for name, _ in named] == ["s/a/x", "s/a/y", "s/b/0", "s/b/1/0", "s/b/1/1"]


@pytest.mark.parametrize("args, message", [
    (["--export_hlo=/tmp/unused", "--strategy=mirrored"], "--strategy=none"),
    (["--export_hlo=/tmp/unused", "--mode=function"], "--mode unset or xla"),
    (["--export_target=gpu"], "--export_target applies to --export_hlo only"),
])
def test_export_flags_refuse_what_cannot_be_exported(args, message):
    with pytest.raises(flags.IllegalFlagValueError, match=message):
        flag_groups.parse_flags("maml", args)


@needs_jax
@pytest.mark.parametrize("variant", ["default", "fp32"])
def test_replay_reproduces_tensorflows_maml_step(maml_export, variant):
    from benchmarks import xla_replay
    path = maml_export[0]
    record = xla_replay.replay(path, variant, calls=2, warmup=1)
    assert record["ok"] and record["max_rel_diff"] <= 1e-4 and record["platform"] == "cpu"
    assert record["loss"] == pytest.approx(record["tf_loss"], rel=1e-5)
    assert record["tasks_per_s"] == pytest.approx(2 / record["step_s"]["median"])
    if variant != "default":
        return
    exp = export.read(path)
    run, device, _ = xla_replay.compile_export(exp, variant)
    import jax
    outputs = run([jax.device_put(a, device) for a in exp.inputs])
    new = export.named(exp, "state/weights/", [np.asarray(o) for o in outputs])
    want = export.named(exp, "state/weights/", exp.outputs)
    for name in want:                                    # the new weights, one by one
        np.testing.assert_allclose(new[name], want[name], rtol=1e-4, atol=1e-6)


@needs_jax
def test_replay_reproduces_protonet_and_reports_a_wrong_output(protonet_export, tmp_path):
    from benchmarks import xla_replay
    record = xla_replay.replay(protonet_export, calls=2, warmup=1)
    assert record["ok"] and record["loss"] == pytest.approx(record["tf_loss"], rel=1e-5)
    assert record["episodes_per_s"] > 0
    # The same export with one expected weight off by 1%: the replay must name it and fail.
    exp = export.read(protonet_export)
    for name in os.listdir(protonet_export):
        (tmp_path / name).write_bytes(open(os.path.join(protonet_export, name), "rb").read())
    outputs = {f"o{i:03d}": a for i, a in enumerate(exp.outputs)}
    index = [o["name"] for o in exp.manifest["outputs"]].index("state/weights/2")
    outputs[f"o{index:03d}"] = outputs[f"o{index:03d}"] * 1.01
    np.savez(tmp_path / export.OUTPUTS, **outputs)
    wide = {f"o{i:03d}": a for i, a in enumerate(exp.reference)}   # float32's error unchanged
    wide[f"o{index:03d}"] = wide[f"o{index:03d}"] * 1.01
    np.savez(tmp_path / export.REFERENCE, **wide)
    wrong = xla_replay.replay(str(tmp_path), calls=1, warmup=1)
    assert not wrong["ok"] and wrong["worst_output"] == "state/weights/2"


def test_float64_reference_sets_how_far_a_replay_may_be_from_tensorflow():
    """A replay is held to max(tolerance, 3 x TensorFlow's float32 error against float64)."""
    from benchmarks import xla_replay
    manifest = {"args": [], "outputs": [{"name": "metrics/loss"}, {"name": "state/weights/0"}]}
    exact = [np.float64(1.0), np.array([1.0, 2.0])]
    tf32 = [np.float32(1.0), np.array([1.0 + 2e-3, 2.0], np.float32)]   # 1e-3 of the max, 2
    exp = export.Export("x", manifest, [], tf32, exact)
    for off, ok in ((5e-3, True), (8e-3, False)):        # 2.5x and 4x TensorFlow's own error
        diffs, allowed, _ = xla_replay.compare([tf32[0], tf32[1] + [off, 0]], exp, 1e-4)
        assert allowed["state/weights/0"] == pytest.approx(3e-3, rel=1e-3)
        assert (diffs["state/weights/0"] <= allowed["state/weights/0"]) == ok
    _, allowed, _ = xla_replay.compare(tf32, exp._replace(reference=None), 1e-4)
    assert allowed["state/weights/0"] == 1e-4           # no float64 outputs: the tolerance


def test_export_holds_the_steps_float64_outputs(protonet_export):
    exp = export.read(protonet_export)
    assert exp.manifest["reference64"] and len(exp.reference) == len(exp.outputs)
    loss = exp.manifest["loss_index"]
    assert exp.reference[loss].dtype == np.float64
    assert float(exp.reference[loss]) == pytest.approx(exp.manifest["loss"], rel=1e-5)
    assert float(exp.reference[loss]) != exp.manifest["loss"]   # float64, not a copy


@pytest.fixture(scope="module")
def conv4_maml_export(tmp_path_factory):
    """Config A's step (second-order MAML, conv4 with stride-2 blocks, Adam) at a small size:
    3-way 1-shot 2-query, 2 tasks, 4 filters on 12x12 images."""
    shape = (12, 12, 1)
    init, apply = nets.conv4(3, channels=4, in_shape=shape, pool="stride")
    state = maml.init_state(init(seed=0), inner_lr=0.4)
    step = maml.make_train_step(apply, inner_steps=1, outer_lr=1e-3)
    path = str(tmp_path_factory.mktemp("conv4_maml"))
    config = {"family": "maml", "net": "conv4", "pool": "stride", "channels": 4,
              "image_shape": shape, "n_way": 3, "k_shot": 1, "q_query": 2, "meta_batch": 2,
              "inner_steps": 1, "inner_lr": 0.4, "outer_lr": 1e-3, "loss": "cross_entropy",
              "algorithm": {"order": "second", "lr_mode": "fixed", "msl": False}}
    export.write(path, step, state, small_batch(2, 3, 1, 2, shape), config=config)
    return path


@needs_torch
@pytest.mark.slow
def test_torch_reference_from_export_computes_tensorflows_loss_and_update(conv4_maml_export):
    from benchmarks import torch_reference as ref
    config, params, batch, tf_loss = ref.from_export(conv4_maml_export)
    assert batch[0].shape == (2, 3, 1, 12, 12) and batch[1].dtype.is_floating_point is False
    loss = ref.build_step(config, params, batch)()
    assert loss == pytest.approx(tf_loss, rel=1e-5)
    exp = export.read(conv4_maml_export)
    want = export.named(exp, "state/weights/", exp.outputs).values()
    for got, w in zip(params, want):                      # one Adam step from the same weights
        got = got.detach().numpy()
        got = got.transpose(2, 3, 1, 0) if got.ndim == 4 else got.T if got.ndim == 2 else got
        np.testing.assert_allclose(got, w, rtol=1e-4, atol=2e-6)


@needs_torch
def test_torch_reference_from_export_refuses_other_steps(maml_export, tmp_path):
    from benchmarks import torch_reference as ref
    with pytest.raises(ValueError, match="net=None"):        # the MLP export
        ref.from_export(maml_export[0])
    result = subprocess.run([sys.executable, "-m", "benchmarks.torch_reference",
                             f"--from_export={maml_export[0]}", "--n_way=5"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "drop --n_way" in result.stderr


@needs_jax
@needs_torch
@pytest.mark.slow
def test_gpu_check_prepares_and_runs_end_to_end_on_cpu(tmp_path):
    folder = tmp_path / "gpu_check"
    small = ["--bench_flag=--meta_batch=2", "--bench_flag=--channels=4",
             "--bench_flag=--image_shape=16,16,1", "--bench_flag=--q_query=2"]
    checks = "--checks=maml_5way,protonet_5way"
    subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "prepare", f"--dir={folder}",
                    checks, *small], check=True, capture_output=True, timeout=600)
    assert (folder / "python" / "absl" / "flags" / "__init__.py").exists()
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "run",
                             f"--dir={folder}", checks, "--variants=default", "--calls=2",
                             "--warmup=1", "--timeout_s=300", "--budget_s=600"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((folder / "gpu_check.json").read_text())
    assert report["ok"] and report["torch_device"] == "cpu"
    opcodes = json.loads((folder / "maml_5way" / "manifest.json").read_text())["variants"]
    assert "convolution" in opcodes["default"]["opcodes"]          # traced for a GPU (devices)
    assert "opt-barrier" not in opcodes["default"]["opcodes"]
    for name in ("maml_5way", "protonet_5way"):
        res = report["results"][name]
        manifest = json.loads((folder / name / "manifest.json").read_text())
        assert manifest["target"] == "gpu" and manifest["reference64"]  # float64 from the CPU form
        xla, torch_run = res["replay"]["default"]["record"], res["torch"]["record"]
        assert xla["ok"] and xla["target"] in ("cpu", "gpu")
        assert torch_run["first_loss"] == pytest.approx(xla["tf_loss"], rel=1e-5)
        assert res["torch_over_xla"] == pytest.approx(
            torch_run["step_s"]["median"] / xla["step_s"]["median"])
