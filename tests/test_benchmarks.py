"""Benchmark binaries (run as subprocesses with tiny shapes), their flag validation, and the
analytic FLOP counts (against hand counts and against the products XLA actually compiles).

The binaries define global absl flags, so they are never imported here: flag validation is tested
through ``flag_groups.parse_flags`` (a private ``FlagValues``) and everything else through
subprocesses, kept to a handful where they import TensorFlow. The last part checks the binaries as
a user meets them: ``--help``, errors and a quiet console.
"""

import configparser
import csv
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf
from absl import app, flags, logging

from benchmarks import flag_groups, runner
from functional_meta import checkpoints, data, flops, maml, presets, protonet

ROOT = Path(__file__).resolve().parents[1]
# A MAML step that compiles in about two seconds on one CPU core (a conv4 step takes ~20 s).
TINY_MAML = ["--preset=maml_mnist_mlp", "--hidden=8", "--image_shape=4,4,1", "--n_way=3",
             "--k_shot=1", "--q_query=1", "--meta_batch=2", "--steps=2", "--device=cpu"]
TINY_PROTONET = ["--channels=4", "--image_shape=8,8,1", "--pool=stride", "--n_way=3",
                 "--k_shot=2", "--q_query=1", "--meta_batch=2", "--steps=2", "--device=cpu"]


def run_module(module, *args, timeout=240):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def last_json(done):
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_timing(record, algorithm_flops):
    step = record["step_s"]
    assert 0 < step["min"] <= step["median"] <= step["max"]
    assert 0 <= step["iqr"] <= step["max"] - step["min"]
    assert record["first_call_s"] > 0
    assert record["tasks_per_s"] == pytest.approx(record["config"]["meta_batch"] / step["median"])
    assert record["flops_per_step"] == algorithm_flops
    assert record["achieved_flops_per_s"] == pytest.approx(algorithm_flops / step["median"])
    assert record["matmul_flops_per_s"] > 1e8 and record["matmul_size"] == 1024
    assert record["peak_memory_kind"] == "process_peak_rss"
    assert record["peak_memory_bytes"] > 50 * 2 ** 20       # TensorFlow alone is bigger
    assert record["device"] == "cpu" and record["tf_version"] == tf.__version__
    # The binaries switch oneDNN on unless the caller chose (benchmarks/__init__.py).
    assert record["onednn"] == os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1")
    # ... and XLA's one-thread matrix products, unless the caller set that flag.
    caller = os.environ.get("XLA_FLAGS", "")
    assert record["xla_flags"] == (caller if "xla_cpu_multi_thread_eigen" in caller else
                                   f"{caller} --xla_cpu_multi_thread_eigen=false".strip())
    assert math.isfinite(record["loss"])


@pytest.mark.slow
def test_maml_bench_reports_every_number_and_writes_a_profile(tmp_path):
    profile = tmp_path / "profile"
    done = run_module("benchmarks.maml_bench", *TINY_MAML, "--inner_steps=2", "--msl",
                      "--lr_mode=lslr", "--recompute", "--task_chunk=1", "--warmup=2",
                      "--data=synthetic_classes", f"--profile_dir={profile}", "--json")
    record = last_json(done)
    config = record["config"]
    assert (config["n_way"], config["k_shot"], config["meta_batch"], config["inner_steps"]) \
        == (3, 1, 2, 2)
    assert config["hidden"] == [8] and config["image_shape"] == [4, 4, 1]
    assert record["algorithm"] == {"inner_steps": 2, "order": "second", "lr_mode": "lslr",
                                   "msl": True, "recompute": True, "task_chunk": 1}
    assert record["mode"] == "xla"                          # the CPU default for MAML
    assert record["steps"] == 2 and record["warmup"] == 2
    assert record["data"] == "synthetic_classes" and "tf.data" in record["input"]
    wait = record["input_wait_s"]
    assert 0 <= wait["min"] <= wait["median"] <= wait["max"] <= record["step_s"]["max"]
    assert record["stalled"] == (record["stalled_steps"] > 0)
    check_timing(record, flops.maml_step(config, first_order=False, multi_step_loss=True))
    assert "step time" in done.stdout and "tasks/s" in done.stdout and "stalled" in done.stdout
    assert list(profile.glob("plugins/profile/*/*.xplane.pb")), "no profiler trace written"


@pytest.mark.slow
def test_sweep_runs_protonet_in_eager_and_function_mode_and_writes_csv_and_plot(tmp_path):
    table = tmp_path / "sweep.csv"
    done = run_module("benchmarks.sweep", "--bench=protonet", "--grid=mode=eager,function",
                      f"--csv={table}", "--", *TINY_PROTONET, "--metric=cosine")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(table.open()))
    assert [r["mode"] for r in rows] == ["eager", "function"]
    config = presets.get("protonet_omniglot", channels=4, image_shape=(8, 8, 1), pool="stride",
                         n_way=3, k_shot=2, q_query=1, meta_batch=2)
    for row in rows:
        assert row["error"] == "" and row["device"] == "cpu"
        seconds = float(row["step_median_ms"]) / 1e3
        assert float(row["tasks_per_s"]) == pytest.approx(2 / seconds, rel=1e-6)
        assert float(row["achieved_gflops"]) * 1e9 * seconds == pytest.approx(
            flops.protonet_step(config), rel=1e-6)
        assert float(row["peak_memory_mib"]) > 50 and float(row["first_call_s"]) > 0
        assert row["input_wait_max_ms"] == "" and row["stalled"] == "False"  # fixed batch
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "sweep.png").stat().st_size > 1000
    else:
        assert "matplotlib is not installed" in done.stdout


@pytest.mark.slow
def test_data_dependent_flag_errors_exit_before_compiling():
    # synthetic_classes has 20 images per class: 15 + 10 do not fit.
    done = run_module("benchmarks.maml_bench", *TINY_MAML, "--data=synthetic_classes",
                      "--k_shot=15", "--q_query=10")
    assert done.returncode != 0
    assert "--k_shot + --q_query = 15 + 10" in done.stderr
    assert "first call" not in done.stderr                 # nothing was traced or compiled
    done = run_module("benchmarks.maml_bench", *TINY_MAML, "--task_chunk=3")
    assert done.returncode != 0 and "--task_chunk=3 must divide the meta-batch" in done.stderr
    assert "first call" not in done.stderr


def test_too_many_ways_for_the_data_names_n_way():
    config = presets.get("maml_omniglot_5way", n_way=5)
    with pytest.raises(app.UsageError, match="--n_way=5 but --data=synthetic_classes has 4"):
        runner.check_classes(config, data.synthetic(4, 20, (28, 28, 1)), "synthetic_classes")
    runner.check_classes(config, data.synthetic(5, 2, (28, 28, 1)), "synthetic_classes")
    with pytest.raises(app.UsageError, match="--image_shape=28,28,1"):
        runner.check_classes(config, data.synthetic(5, 2, (14, 14, 1)), "synthetic_classes")


@pytest.mark.parametrize("family, args, named", [
    ("maml", ["--n_way=-1"], "--n_way"),
    ("maml", ["--meta_batch=0"], "--meta_batch"),
    ("maml", ["--preset=protonet_omniglot"], "--preset"),   # another family's preset
    ("maml", ["--mode=fast"], "--mode"),
    ("protonet", ["--device=tpu"], "--device"),
    ("maml", ["--image_shape=28,x"], "--image_shape"),
    ("maml", ["--pool=max", "--image_shape=8,8,1"], "--image_shape"),  # feature map vanishes
    ("maml", ["--data=omniglot"], "--data_path"),
    ("maml", ["--data=sinusoid"], "--data=sinusoid"),
    ("maml", ["--preset=maml_sinusoid", "--net=conv4"], "--channels"),
    ("protonet", ["--net=mlp"], "--hidden"),
    ("protonet", ["--inner_steps=2"], "inner_steps"),
    ("maml", ["--steps=0"], "--steps"),
])
def test_invalid_flags_are_rejected_while_parsing_and_named(family, args, named):
    with pytest.raises(flags.Error, match=re.escape(named)):
        flag_groups.parse_flags(family, args)


def test_flags_override_the_preset_and_unset_flags_keep_it():
    fv = flag_groups.parse_flags("maml", ["--preset=maml_omniglot_20way", "--inner_steps=2",
                                     "--image_shape=14,14,1"])
    config = flag_groups.config_from_flags("maml", fv)
    expected = dict(presets.PRESETS["maml_omniglot_20way"], inner_steps=2, image_shape=(14, 14, 1))
    assert {k: config[k] for k in expected} == expected


@pytest.mark.parametrize("args, expected", [([], "auto"), (["--inner_loop=looped"], "looped"),
                                              (["--inner_loop=unrolled"], "unrolled")])
def test_inner_loop_flag_reaches_the_step_options(args, expected):
    fv = flag_groups.parse_flags("maml", ["--inner_steps=3", *args])
    config = flag_groups.config_from_flags("maml", fv)
    assert flag_groups.maml_options(config, flag_values=fv)["inner_loop"] == expected


def test_console_scripts_point_at_run():
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    for name, module in (("fm-maml-bench", "maml_bench"), ("fm-protonet-bench", "protonet_bench"),
                         ("fm-sweep", "sweep"), ("fm-torch-reference", "torch_reference"),
                         ("fm-tf-reference", "tf_reference")):
        assert scripts.get(name) == f"benchmarks.{module}:run"
        source = importlib.util.find_spec(f"benchmarks.{module}").origin
        assert "def run():" in Path(source).read_text()


# ---------------------------------------------------------------------------------------------
# FLOP counts.

def test_forward_flops_match_a_hand_count():
    # conv4, stride 2, 8x8x1 -> 4x4 -> 2x2 -> 1x1 -> 1x1, 4 filters, 3-way head:
    # 2*9*C_in*C_out*pixels: 18*1*4*16, 18*4*4*4, 18*4*4*1, 18*4*4*1; head 2*4*3.
    stride = dict(family="maml", net="conv4", channels=4, pool="stride", image_shape=(8, 8, 1),
                  n_way=3)
    assert flops.network_layers(stride) == [1152, 1152, 288, 288, 24]
    # Max pooling: convolutions at 16x16, 8x8, 4x4, 2x2 with 2 input channels first, no head.
    pooled = dict(stride, family="protonet", pool="max", image_shape=(16, 16, 2))
    assert flops.forward(pooled) == 18 * (2 * 4 * 256 + 16 * 64 + 16 * 16 + 16 * 4)
    # mlp 784-64-64-5 and the sinusoid 1-40-40-1.
    mlp = dict(family="maml", net="mlp", hidden=(64, 64), image_shape=(28, 28, 1), n_way=5)
    assert flops.forward(mlp) == 2 * (784 * 64 + 64 * 64 + 64 * 5)
    assert flops.forward(presets.get("maml_sinusoid")) == 2 * (40 + 40 * 40 + 40)
    assert flops.gradient(mlp) == 3 * flops.forward(mlp) - 2 * 784 * 64


def compiled_flops(hlo, ops=("dot", "convolution")):
    """FLOPs of the products in optimised HLO text: 2 * output elements * contracted size.

    The losses' own small products (softmax cross-entropy's second derivative) are skipped: the
    analytic count leaves losses out.
    """
    shapes, products = {}, []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]\S* ([\w\-]+)\((.*)", line)
        if m:
            name, dims, op, rest = m.groups()
            shapes[name] = [int(d) for d in dims.split(",") if d]
            if op in ops and "oftmax" not in rest:
                products.append((name, op, rest))
    total = 0
    for name, op, rest in products:
        operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
        if op == "dot":
            lhs = shapes[operands[0]]
            contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1)
            size = math.prod(lhs[int(i)] for i in contract.split(","))
        else:
            assert "batch_group_count" not in rest, "extend compiled_flops to batch groups"
            rhs = shapes[operands[1]]
            kernel_labels = re.search(r"dim_labels=\w+_(\w+)->", rest).group(1)
            size = math.prod(rhs) // rhs[kernel_labels.index("o")]
        total += 2 * math.prod(shapes[name]) * size
    return total


def _tasks(config, seed=0):
    return tuple(tf.constant(a) for a in runner.synthetic_batch(config, seed))


@pytest.mark.slow
@pytest.mark.parametrize("first_order, msl", [(False, True), (True, False)])
def test_maml_step_flops_match_the_compiled_step(first_order, msl):
    config = dict(family="maml", net="mlp", hidden=(6, 5), image_shape=(4,), n_way=3, k_shot=2,
                  q_query=3, meta_batch=2, inner_steps=2, loss="cross_entropy")
    init, apply = presets.network(config)
    step = maml.make_train_step(apply, inner_steps=2, first_order=first_order,
                                step_weights=[0.5, 0.5] if msl else None)
    hlo = step.experimental_get_compiler_ir(maml.init_state(init(0), 0.4, "fixed", 2),
                                            _tasks(config))(stage="optimized_hlo")
    assert compiled_flops(hlo) == flops.maml_step(config, first_order=first_order,
                                                  multi_step_loss=msl)


def test_protonet_step_flops_match_the_compiled_convolutions():
    # Unoptimised HLO (optimising convolutions on CPU takes seconds): it still holds the first
    # layer's input gradient, which XLA prunes later and the analytic count leaves out. Four input
    # channels keep the first block a convolution (with at most three, nets computes it as the
    # same product of patches and kernel, plus the patches' statistics).
    config = dict(family="protonet", net="conv4", channels=4, pool="max", image_shape=(16, 16, 4),
                  n_way=3, k_shot=2, q_query=1, meta_batch=2)
    init, apply = presets.network(config)
    step = protonet.make_train_step(apply, 3)
    hlo = step.compiled.experimental_get_compiler_ir(protonet.init_state(init(0)),
                                                     _tasks(config))(stage="hlo")
    images = 2 * 3 * (2 + 1)
    assert compiled_flops(hlo, ops=("convolution",)) == \
        flops.protonet_step(config) + images * flops.network_layers(config)[0]


@pytest.mark.slow
def test_maml_bench_mirrored_strategy_reports_two_replicas():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.maml_bench", "--preset=maml_sinusoid", "--data=sinusoid",
         "--hidden=8", "--meta_batch=4", "--steps=2", "--strategy=mirrored", "--logical_cpus=2",
         "--mode=function", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["strategy"] == "mirrored" and record["replicas"] == 2
    assert record["tasks_per_s"] > 0


def test_time_interleaved_alternates_rounds_and_rotates_who_goes_first():
    calls = []

    def fake(name):
        def step(state, batch):
            calls.append(name)
            return state + 1, {"loss": float(state)}
        return step

    timings = runner.time_interleaved({"a": (fake("a"), 0), "b": (fake("b"), 10)},
                                      lambda: None, steps=4, warmup=2, per_round=3)
    # First call and one more warm-up call each, then rounds of 3 (a first, then b first).
    assert calls == ["a", "a", "b", "b"] + ["a"] * 3 + ["b"] * 3 + ["b", "a"]
    assert timings["a"]["loss"] == 5.0 and timings["b"]["loss"] == 15.0   # states kept apart
    for timing in timings.values():
        assert timing["first_call_s"] >= 0 and set(timing["step_s"]) == {"median", "min", "max", "iqr"}


# ---------------------------------------------------------------------------------------------
# The binaries as a user meets them.

def imports_tensorflow(done):
    """Whether a process run with ``python -X importtime`` imported TensorFlow."""
    return re.search(r"\|\s+tensorflow\s*$", done.stderr, re.M) is not None


def run_importtime(module, *args):
    return subprocess.run([sys.executable, "-X", "importtime", "-m", module, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def console_scripts():
    """``{binary: module}`` of setup.cfg's console scripts (every binary a user can start)."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict((name.strip(), target.strip().split(":")[0].split(".")[-1])
                for name, target in (line.split("=") for line in lines))


# A few flags of some binaries that --help must list (the binary's own and its flag groups').
HELP_FLAGS = {
    "train": ["--algorithm", "--out_dir", "--plots", "--data_path", "--split"],
    "evaluate": ["--checkpoint", "--num_episodes", "--eval_split", "--data", "--k_shot"],
    "maml_bench": ["--preset", "--inner_steps", "--first_order", "--steps", "--strategy"],
    "protonet_bench": ["--preset", "--metric", "--n_way", "--mode"],
    "maml_study": ["--train_steps", "--lr_mode", "--data"],
    "sweep": ["--grid", "--bench", "--csv"],
    "torch_reference": ["--preset", "--threads", "--n_way"],
    "tf_reference": ["--interleaved", "--mode", "--n_way"],
}
# fm-tf-reference's module is the straightforward TensorFlow step itself.
HELP_IMPORTS_TENSORFLOW = {"tf_reference"}


@pytest.mark.parametrize("module", [
    pytest.param(m, marks=pytest.mark.slow) if m in HELP_IMPORTS_TENSORFLOW else m
    for m in sorted(console_scripts().values())])
def test_help_lists_the_flags_without_importing_tensorflow(module):
    done = run_importtime(f"benchmarks.{module}", "--help")
    for flag in HELP_FLAGS.get(module, []):
        assert re.search(rf"^  --(\[no\])?{flag[2:]}:", done.stdout, re.M), (flag, done.stdout)
    assert done.stdout.count("\n  --") >= max(3, len(HELP_FLAGS.get(module, [])))
    assert imports_tensorflow(done) == (module in HELP_IMPORTS_TENSORFLOW)


def test_a_mistyped_flag_is_named_without_importing_tensorflow():
    done = run_importtime("benchmarks.train", "--algoritm=maml")
    assert done.returncode != 0 and "Did you mean: algorithm" in done.stderr
    assert not imports_tensorflow(done)


@pytest.mark.slow
def test_start_tensorflow_leaves_out_the_start_up_lines_unless_asked():
    code = "import benchmarks; benchmarks.start_tensorflow()"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    quiet = subprocess.run([sys.executable, "-c", code + "; import sys; print('own line', "
                            "file=sys.stderr)"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
    asked = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                           env=dict(env, TF_CPP_MIN_LOG_LEVEL="0"), capture_output=True,
                           text=True, timeout=120)
    assert quiet.returncode == 0 and asked.returncode == 0, quiet.stderr + asked.stderr
    assert quiet.stderr == "own line\n"
    assert "oneDNN custom operations" in asked.stderr           # what a user who asks sees


def start_up_noise(text):
    """Lines of TensorFlow's C++ start-up (or of its saver) in a binary's output."""
    return [line for line in text.splitlines() if re.search(
        r"cuInit|oneDNN|This TensorFlow binary is optimized|absl::InitializeLog|cuda drivers"
        r"|XLA service|Sharding callback", line)]


@pytest.mark.slow
def test_train_and_eval_consoles_are_quiet_and_eval_names_its_checkpoint(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    run = tmp_path / "run"

    def binary(module, *args):
        done = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert start_up_noise(done.stdout + done.stderr) == []
        return done

    trained = binary("train", "--algorithm=maml", "--data=sinusoid", "--hidden=8", "--nojit",
                     "--steps=4", "--checkpoint_every=2", "--log_every=2", "--val_every=2",
                     "--val_episodes=2", f"--out_dir={run}")
    assert "trained maml to step 4" in trained.stdout
    best = binary("evaluate", f"--checkpoint={run}", "--num_episodes=2", "--nojit")
    scored = [line for line in best.stdout.splitlines() if " mse " in line]
    assert scored and all(f"maml {run}/best/ckpt-" in line for line in scored), best.stdout
    assert "no best checkpoint" not in best.stderr
    shutil.rmtree(run / "best")              # as a run that never validated leaves it
    latest = binary("evaluate", f"--checkpoint={run}", "--num_episodes=2", "--nojit")
    assert f"maml {run}/checkpoints/ckpt-4 (step 4): mse" in latest.stdout, latest.stdout
    assert f"{run} holds no best checkpoint" in latest.stderr
    assert f"scoring the latest, {run}/checkpoints/ckpt-4" in latest.stderr


def test_checkpoint_saves_log_tensorflow_info_only_at_debug_verbosity(tmp_path, caplog):
    store = checkpoints.Checkpoints(tmp_path, {"weights": [tf.zeros([2])]})
    info = dict(step=1, data_seed=0, next_batch=1, best_score=0.0, best_step=-1)
    verbosity = logging.get_verbosity()
    try:
        for step, level in ((1, logging.INFO), (2, logging.DEBUG)):
            logging.set_verbosity(level)
            with caplog.at_level("DEBUG"):
                caplog.clear()
                store.save({"weights": [tf.zeros([2])]}, dict(info, step=step))
                chatter = [r for r in caplog.records if "Sharding callback" in r.getMessage()]
            assert bool(chatter) == (level == logging.DEBUG), caplog.records
    finally:
        logging.set_verbosity(verbosity)


def fm_train_error(*args, python_code=None):
    """An fm-train run that must fail at once: its stderr (run with ``-X importtime``)."""
    command = ["-c", python_code, *args] if python_code else ["-m", "benchmarks.train", *args]
    done = subprocess.run([sys.executable, "-X", "importtime", *command], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert not imports_tensorflow(done)          # before any work: TensorFlow was not loaded
    return done.stderr


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file", "read_only"])
def test_an_unwritable_out_dir_is_an_error_before_any_work(tmp_path, where):
    # A folder cannot exist under a regular file nor where a file is, even for root (whom a
    # read-only folder does not stop).
    (tmp_path / "file.txt").write_text("not a folder")
    out_dir = {"under_a_file": tmp_path / "file.txt" / "sub", "is_a_file": tmp_path / "file.txt",
               "read_only": tmp_path / "read_only"}[where]
    if where == "read_only":
        if os.geteuid() == 0:
            pytest.skip("root writes to read-only folders")
        out_dir.mkdir(mode=0o500)
    stderr = fm_train_error("--algorithm=maml", "--data=sinusoid", f"--out_dir={out_dir}")
    assert f"--out_dir={out_dir} is not a folder this process can write to" in stderr


# Runs fm-train in a Python where importing matplotlib fails, as where it is not installed.
WITHOUT_MATPLOTLIB = """
import runpy, sys

class NoMatplotlib:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoMatplotlib())
sys.argv[0] = "fm-train"
runpy.run_module("benchmarks.train", run_name="__main__", alter_sys=True)
"""


def test_plots_without_matplotlib_is_an_error_at_the_start(tmp_path):
    stderr = fm_train_error("--algorithm=maml", "--data=sinusoid", "--plots",
                            f"--out_dir={tmp_path / 'run'}", python_code=WITHOUT_MATPLOTLIB)
    assert "--plots needs matplotlib" in stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
