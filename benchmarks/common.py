"""Flags and helpers shared by the binaries in ``benchmarks/``.

Flags come in groups, each defined by one function so any binary takes the groups it needs:
``define_model_flags`` (preset and network), ``define_episode_flags`` (way, shot, query,
meta-batch), ``define_maml_flags`` / ``define_protonet_flags`` (the algorithm),
``define_data_flags``, ``define_device_flags`` and ``define_benchmark_flags``. Every model,
episode and algorithm flag defaults to ``None``, meaning "the preset's value";
``config_from_flags`` resolves the preset with the flags that were given. Each function takes
``flag_values`` (default: the global ``FLAGS``), so a sweep can parse and validate a binary's
flags into a private ``flags.FlagValues`` without running it (``parse_flags``).

Bad flags fail while parsing, before anything compiles: per-flag bounds and choices, and a
validator on ``--preset`` that resolves the whole configuration and builds (but does not run) its
network. Checks that need the data (ways against classes, shots against images per class) run in
``input_batches`` right after loading, still before the first step.

``run_benchmark(family, build_step)`` is the benchmark itself, shared by ``maml_bench`` and
``protonet_bench``, which differ only in ``build_step``. Method:

1. Input: ``--data=synthetic`` puts one random batch on the device and reuses it (pure step
   time); any other source is loaded, checked and served by a prefetching ``tf.data`` pipeline.
2. Reference: dense float32 matmul FLOP/s on the same device, in the same process.
3. Warm-up: the first call (trace + compile + run) is timed and reported on its own, then
   ``--warmup - 1`` more untimed calls.
4. ``--steps`` timed steps, each ending with ``float(metrics['loss'])`` so the device has finished;
   a step's time includes waiting for its input, which is also timed on its own (a step *stalls*
   when that wait is over ``STALL_FRACTION`` of it).
5. Report: median, min, max and IQR of the step time; tasks/s = meta_batch / median; achieved
   FLOP/s = analytic FLOPs per step (``functional_meta.flops``) / median; peak memory (GPU
   allocator peak from after the reference matmul, or on CPU the process's peak RSS).
"""

import json
import math
import os
import platform
import resource
import sys
import time

import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from functional_meta import data as data_lib
from functional_meta import distribute, episodes, presets, training

FLAGS = flags.FLAGS

DEFAULT_PRESET = {"maml": "maml_omniglot_5way", "protonet": "protonet_omniglot"}
MODES = ("xla", "function", "eager")
# --data of the benchmarks: 'synthetic' is one fixed random batch kept on the device (no input
# pipeline, pure step time); 'synthetic_classes' is data.load('synthetic') through the same
# episode pipeline as real data; 'sinusoid' the sinusoid regression task pipeline.
BENCH_DATA = ("synthetic", "synthetic_classes", "sinusoid",
              *(s for s in data_lib.SOURCES if s != "synthetic"))
NEEDS_PATH = ("omniglot", "mnist", "folder")
# Model/episode/algorithm flags that override a preset field of the same name.
OVERRIDES = ("net", "channels", "pool", "image_shape", "hidden", "n_way", "k_shot", "q_query",
             "meta_batch", "inner_steps", "inner_lr", "outer_lr")
STALL_FRACTION = 0.1  # a step "stalls" when waiting for its input takes over this share of it


# ----------------------------------------------------------------------------------------------
# Flags.

class _BadList(ValueError):
    """A list flag that is not positive integers (reported by that flag's own validator)."""


def _int_list(value, name):
    """``['28', '28', '1']`` -> ``(28, 28, 1)``; ``ValueError`` naming ``--name`` otherwise."""
    try:
        ints = tuple(int(v) for v in value)
    except ValueError:
        ints = ()
    if not ints or min(ints) < 1:
        raise _BadList(f"--{name}={','.join(value)} must be positive integers separated by "
                         f"commas (e.g. --{name}=28,28,1)")
    return ints


def _list_validator(name, flag_values):
    def check(value):
        if value is not None:
            try:
                _int_list(value, name)
            except ValueError as e:
                raise flags.ValidationError(str(e))
        return True
    flags.register_validator(name, check, flag_values=flag_values)


def define_model_flags(family, flag_values=FLAGS):
    """``--preset`` and the network flags; a validator on ``--preset`` checks the resolved
    configuration."""
    fv = flag_values
    names = sorted(n for n, c in presets.PRESETS.items() if c["family"] == family)
    flags.DEFINE_enum("preset", DEFAULT_PRESET[family], names,
                      "Named configuration from functional_meta.presets. Every model, episode and "
                      "algorithm flag left unset takes the preset's value.", flag_values=fv)
    flags.DEFINE_enum("net", None, ["conv4", "mlp"], "Network (default: the preset's).",
                      flag_values=fv)
    flags.DEFINE_integer("channels", None, "conv4 filters per block.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_enum("pool", None, ["stride", "max"],
                      "conv4 downsampling: stride-2 convolutions or 2x2 max pooling.",
                      flag_values=fv)
    flags.DEFINE_list("image_shape", None, "Input shape, comma separated: H,W,C for conv4 "
                      "(e.g. 28,28,1); any shape for mlp (1 for sinusoids).", flag_values=fv)
    flags.DEFINE_list("hidden", None, "mlp hidden widths, comma separated (e.g. 64,64); a "
                      "ProtoNet mlp's embedding is its last hidden layer.", flag_values=fv)
    _list_validator("image_shape", fv)
    _list_validator("hidden", fv)

    def check_config(_):
        try:
            config_from_flags(family, fv)
        except _BadList:
            pass  # reported by the list flag's validator
        except ValueError as e:
            raise flags.ValidationError(f"invalid configuration: {e}")
        return True
    flags.register_validator("preset", check_config, flag_values=fv)


def define_episode_flags(family, flag_values=FLAGS):
    """``--n_way``, ``--k_shot``, ``--q_query``, ``--meta_batch`` (all preset overrides)."""
    fv = flag_values
    flags.DEFINE_integer("n_way", None, "Classes per episode (N).", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("k_shot", None, "Support examples per class (K).", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("q_query", None, "Query examples per class (Q).", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("meta_batch", None, "Tasks (episodes) per step.", lower_bound=1,
                         flag_values=fv)


def define_maml_flags(flag_values=FLAGS):
    """MAML's inner loop and outer update: steps, rates, order, multi-step loss, recomputation."""
    fv = flag_values
    flags.DEFINE_integer("inner_steps", None, "Inner-loop SGD steps per task.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_float("inner_lr", None, "Inner learning rate alpha (the initial value when "
                       "learned).", lower_bound=0.0, flag_values=fv)
    flags.DEFINE_float("outer_lr", None, "Adam learning rate of the meta-update.",
                       lower_bound=0.0, flag_values=fv)
    flags.DEFINE_bool("first_order", False, "First-order MAML: no gradient through the inner "
                      "steps.", flag_values=fv)
    flags.DEFINE_enum("lr_mode", "fixed", ["fixed", "metasgd", "lslr"],
                      "Inner learning rates: fixed alpha; metasgd = one learned rate per weight "
                      "element (Meta-SGD); lslr = one learned rate per layer and inner step "
                      "(MAML++).", flag_values=fv)
    flags.DEFINE_bool("msl", False, "Multi-step loss: the meta-loss is the query loss after "
                      "every inner step with uniform weights 1/inner_steps (MAML++'s weights at "
                      "the start of training; any all-nonzero weights cost the same).",
                      flag_values=fv)
    flags.DEFINE_bool("recompute", False, "Recompute the inner steps' activations in the "
                      "backward pass instead of storing them.", flag_values=fv)
    flags.DEFINE_integer("task_chunk", None, "Compute the meta-gradient for this many tasks at a "
                         "time, in a loop inside the compiled step that sums them (same result, "
                         "less memory). Must divide the meta-batch (per replica with --strategy). "
                         "Default: for conv4 on a CPU, chunks of at most 80 Omniglot-sized images "
                         "(their activations stay in the caches; config A: 8 tasks), otherwise "
                         "the whole meta-batch at once.", lower_bound=1,
                         flag_values=fv)


def maml_options(config, replicas=1, flag_values=FLAGS):
    """The options of ``maml.make_train_step`` that ``define_maml_flags``' flags ask for, checked
    against ``config`` (a ``UsageError`` naming the flag, before anything compiles)."""
    fv, steps = flag_values, config["inner_steps"]
    per_replica = config["meta_batch"] // replicas
    chunk = fv.task_chunk
    if chunk is None:
        chunk = training.default_task_chunk(config, replicas)
    elif per_replica % chunk:
        raise app.UsageError(f"--task_chunk={chunk} must divide the meta-batch "
                             f"({per_replica} tasks per replica)")
    return dict(inner_steps=steps, outer_lr=config["outer_lr"], first_order=fv.first_order,
                loss=config["loss"], recompute=fv.recompute, task_chunk=chunk,
                step_weights=[1.0 / steps] * steps if fv.msl else None)


def define_protonet_flags(flag_values=FLAGS):
    """ProtoNet's distance and learning rate."""
    flags.DEFINE_float("outer_lr", None, "Adam learning rate.", lower_bound=0.0,
                       flag_values=flag_values)
    flags.DEFINE_enum("metric", "euclidean", ["euclidean", "cosine"],
                      "Distance to the prototypes.", flag_values=flag_values)


def define_data_flags(choices=BENCH_DATA, default="synthetic", flag_values=FLAGS):
    """``--data`` (one of ``choices``), ``--data_path`` and ``--seed``."""
    fv = flag_values
    flags.DEFINE_enum("data", default, list(choices),
                      "Episode source. synthetic: one fixed random batch kept on the device "
                      "(no input pipeline, no download); synthetic_classes: random classes "
                      "through the tf.data episode pipeline; sinusoid: sinusoid regression tasks "
                      "(maml_sinusoid); the others are functional_meta.data.load sources read "
                      "through the same prefetching pipeline.", flag_values=fv)
    flags.DEFINE_string("data_path", None, "Path of the data: a zip or folder for omniglot "
                        "(several joined with ','), a Keras .npz for mnist, a folder for folder, "
                        "an optional TFDS data_dir for the *_tfds sources.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the weights and the episodes.", lower_bound=0,
                         flag_values=fv)

    def check_path(values):
        if values["data"] in NEEDS_PATH and not values["data_path"]:
            raise flags.ValidationError(f"--data={values['data']} needs --data_path")
        for path in (values["data_path"] or "").split(","):
            if path and not os.path.exists(path):
                raise flags.ValidationError(f"--data_path: {path} does not exist")
        return True
    flags.register_multi_flags_validator(["data", "data_path"], check_path, flag_values=fv)


def define_device_flags(flag_values=FLAGS):
    """``--device``, ``--mode`` (execution mode of the step) and ``--strategy``."""
    flags.DEFINE_enum("strategy", "none", list(distribute.STRATEGIES),
                      "Data parallelism over the meta-batch: none, mirrored (every GPU, or every "
                      "logical CPU, see --logical_cpus), multiworker (hosts in TF_CONFIG).",
                      flag_values=flag_values)
    flags.DEFINE_integer("logical_cpus", 0, "Without GPUs: split the CPU into this many logical "
                         "devices, one replica each under --strategy=mirrored (0: whole CPU).",
                         lower_bound=0, flag_values=flag_values)
    flags.DEFINE_enum("device", None, ["cpu", "gpu"], "Where to run (default: gpu if one is "
                      "visible, else cpu).", flag_values=flag_values)
    flags.DEFINE_enum("mode", None, list(MODES),
                      "xla: tf.function(jit_compile=True); function: tf.function without XLA; "
                      "eager: the step's Python function run op by op. Default: xla on GPU; on "
                      "CPU xla for MAML and function for ProtoNet (XLA speeds MAML up on CPU but "
                      "slows ProtoNet's convolutions down).", flag_values=flag_values)


def define_benchmark_flags(flag_values=FLAGS):
    """Steps, warm-up, profiler trace and JSON output of a benchmark run."""
    fv = flag_values
    flags.DEFINE_integer("steps", 20, "Timed steps.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("warmup", 1, "Untimed calls before the timed steps; the first one "
                         "traces and compiles and is reported on its own.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_string("profile_dir", None, "Write a TensorFlow profiler trace of a few extra "
                        "steps here (open with tensorboard --logdir).", flag_values=fv)
    flags.DEFINE_bool("json", False, "Also print one JSON line with the configuration, device "
                      "and every number, as the last line of stdout.", flag_values=fv)


def define_flags(family, flag_values=FLAGS):
    """Every flag of the ``family`` ('maml' | 'protonet') benchmark binary."""
    define_model_flags(family, flag_values)
    define_episode_flags(family, flag_values)
    if family == "maml":
        define_maml_flags(flag_values)
    else:
        define_protonet_flags(flag_values)
    define_data_flags(flag_values=flag_values)
    define_device_flags(flag_values)
    define_benchmark_flags(flag_values)


def parse_flags(family, args):
    """Parse and validate a benchmark's ``args`` (no program name) into a fresh ``FlagValues``,
    without touching the global ``FLAGS``; raises ``flags.Error`` naming the bad flag."""
    fv = flags.FlagValues()
    define_flags(family, fv)
    fv(["benchmark", *args])
    return fv


def run_binary(main, module_name):
    """``app.run(main)`` such that ``--help`` shows the binary's docstring and flags also when it
    is started as a console script (absl describes the module named by ``sys.argv[0]``, which for
    a console script is the generated wrapper, not ``module_name``)."""
    module = sys.modules[module_name]
    for flag in FLAGS.get_key_flags_for_module(module):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    sys.modules["__main__"].__doc__ = module.__doc__
    app.run(main)


# ----------------------------------------------------------------------------------------------
# Configuration, network and input.

def _value(fv, name):
    # fv[name].value, not fv.name: it also works inside validators, before parsing completes.
    return fv[name].value if name in fv else None


def config_from_flags(family, flag_values=FLAGS):
    """The preset named by ``--preset`` with every given override flag applied, checked.

    Raises ``ValueError`` naming the flags when the network cannot be built or the data source does
    not fit the task (e.g. ``--data=sinusoid`` with a classification preset).
    """
    fv = flag_values
    overrides = {n: _value(fv, n) for n in OVERRIDES if _value(fv, n) is not None}
    for name in ("image_shape", "hidden"):
        if name in overrides:
            overrides[name] = _int_list(overrides[name], name)
    config = {"name": _value(fv, "preset"), **presets.get(_value(fv, "preset"), **overrides)}
    if config["net"] == "conv4" and not {"channels", "pool"} <= set(config):
        raise ValueError(f"--net=conv4 needs --channels and --pool (preset {config['name']} "
                         f"has none)")
    if config["net"] == "mlp" and "hidden" not in config:
        raise ValueError(f"--net=mlp needs --hidden (preset {config['name']} has none)")
    try:
        presets.network(config)
    except ValueError as e:
        raise ValueError(f"--net/--channels/--pool/--image_shape/--hidden/--n_way: {e}") from None
    source = _value(fv, "data")
    regression = config.get("loss") == "mse"
    if source == "sinusoid" and not (regression and tuple(config["image_shape"]) == (1,)
                                     and config["n_way"] == 1):
        raise ValueError("--data=sinusoid needs a regression configuration with --image_shape=1 "
                         "and --n_way=1 (e.g. --preset=maml_sinusoid)")
    if source not in (None, "synthetic", "sinusoid"):
        shape = tuple(config["image_shape"])
        if regression:
            raise ValueError(f"--data={source} gives classification episodes but preset "
                             f"{config['name']} is a regression (loss mse)")
        if len(shape) != 3 or shape[0] != shape[1]:
            raise ValueError(f"--data={source} needs square images: --image_shape=S,S,C, got "
                             f"{','.join(map(str, shape))}")
    return config


def synthetic_batch(config, seed):
    """One random meta-batch with the configuration's static shapes, as numpy arrays.

    Classification: images uniform in [0, 1], every class ``k_shot`` times in each support set and
    ``q_query`` times in each query set. Regression: inputs uniform in [-5, 5], normal targets.
    """
    rng = np.random.default_rng(seed)
    t, n, k, q = (config[f] for f in ("meta_batch", "n_way", "k_shot", "q_query"))
    shape = tuple(config["image_shape"])
    if config.get("loss") == "mse":
        xs = [rng.uniform(-5, 5, (t, n * m) + shape).astype(np.float32) for m in (k, q)]
        ys = [rng.normal(size=(t, n * m, 1)).astype(np.float32) for m in (k, q)]
    else:
        xs = [rng.uniform(0, 1, (t, n * m) + shape).astype(np.float32) for m in (k, q)]
        ys = [np.stack([rng.permutation(np.repeat(np.arange(n, dtype=np.int32), m))
                        for _ in range(t)]) for m in (k, q)]
    return xs[0], ys[0], xs[1], ys[1]


def load_classes(config, source, path, seed):
    """``ClassData`` for an image ``source`` (``'synthetic_classes'`` = ``data.load('synthetic')``),
    images resized to the configuration's ``image_shape``."""
    shape = tuple(config["image_shape"])
    name = "synthetic" if source == "synthetic_classes" else source
    return data_lib.load(name, path=path, image_size=shape[0], image_shape=shape, seed=seed)


def check_classes(config, classes, source):
    """``app.UsageError`` naming the flag when the episodes cannot be drawn from ``classes``."""
    n, k, q = config["n_way"], config["k_shot"], config["q_query"]
    if n > len(classes):
        raise app.UsageError(f"--n_way={n} but --data={source} has {len(classes)} classes")
    smallest = min(len(x) for x in classes.images)
    if k + q > smallest:
        raise app.UsageError(f"--k_shot + --q_query = {k} + {q} = {k + q} images per class but "
                             f"the smallest class of --data={source} has {smallest}")
    shape = tuple(classes.images[0].shape[1:])
    if shape != tuple(config["image_shape"]):
        raise app.UsageError(f"--image_shape={','.join(map(str, config['image_shape']))} but "
                             f"--data={source} images are {','.join(map(str, shape))}")


def input_batches(config, source, path, seed):
    """``next_batch()`` for the benchmark loop and a description of the input.

    ``synthetic``: the same batch every step, placed on the device once. Otherwise batches come
    from a prefetching ``tf.data`` pipeline (``episodes.dataset`` or ``episodes.sinusoid_dataset``);
    data are loaded and checked here, before any step is built.
    """
    if source == "synthetic":
        batch = tuple(tf.identity(a) for a in synthetic_batch(config, seed))  # on the device
        return (lambda: batch), "one fixed batch on the device"
    t, k, q = config["meta_batch"], config["k_shot"], config["q_query"]
    if source == "sinusoid":
        dataset = episodes.sinusoid_dataset(t, k, q, seed=seed)
    else:
        logging.info("loading --data=%s", source)
        classes = load_classes(config, source, path, seed)
        check_classes(config, classes, source)
        sampler = episodes.EpisodeSampler(classes, config["n_way"], k, q, t, seed)
        dataset = episodes.dataset(sampler, prefetch=2)
    iterator = iter(dataset)
    return (lambda: next(iterator)), "tf.data pipeline, prefetch 2"


# ----------------------------------------------------------------------------------------------
# Device, reference matmul, memory.

def make_strategy(name, logical_cpus):
    """``None`` for ``'none'``, else the ``tf.distribute`` strategy (see ``functional_meta.distribute``);
    ``logical_cpus > 1`` first splits a GPU-less CPU into that many logical devices."""
    if name == "none":
        return None
    try:
        strategy = distribute.make_strategy(name, logical_cpus=logical_cpus)
    except ValueError as error:
        raise app.UsageError(f"--strategy={name}: {error}") from None
    logging.info("--strategy=%s: %d replicas", name, strategy.num_replicas_in_sync)
    return strategy


def choose_device(requested):
    """``'cpu'`` or ``'gpu'``; ``--device=cpu`` hides the GPUs. Call before any TensorFlow op."""
    gpus = tf.config.list_physical_devices("GPU")
    if requested == "gpu" and not gpus:
        raise app.UsageError("--device=gpu but TensorFlow sees no GPU")
    device = requested or ("gpu" if gpus else "cpu")
    if device == "cpu" and gpus:
        tf.config.set_visible_devices([], "GPU")
    return device


def default_mode(family, device):
    return "xla" if device == "gpu" or family == "maml" else "function"


def device_name(device):
    """A readable name: the GPU model, or the CPU model and the cores this process may use."""
    if device == "gpu":
        details = tf.config.experimental.get_device_details(
            tf.config.list_physical_devices("GPU")[0])
        return details.get("device_name", "GPU")
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def matmul_flops_per_s(device):
    """Dense float32 matmul FLOP/s on this device: a chain of square products in one
    ``tf.function`` (2048^2 on GPU, 1024^2 on CPU), median of 3 calls, result forced to the host.

    On GPUs with TensorFloat-32 (TensorFlow's default) this is the TF32 rate, as for the steps."""
    size, chain = (2048, 16) if device == "gpu" else (1024, 2)
    a = tf.random.stateless_normal([size, size], seed=[0, 0]) / math.sqrt(size)

    @tf.function
    def products(x):
        for _ in range(chain):
            x = tf.matmul(a, x)
        return x[0, 0]

    float(products(a))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        float(products(a))
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 * chain / float(np.median(times)), size


def reset_peak_memory(device):
    if device == "gpu":
        tf.config.experimental.reset_memory_stats("GPU:0")


def peak_memory(device):
    """``(bytes, what)``: the GPU allocator's peak since the last reset, or on CPU the process's
    peak resident set size (everything since start-up, TensorFlow itself included)."""
    if device == "gpu":
        return tf.config.experimental.get_memory_info("GPU:0")["peak"], "gpu_allocator_peak"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss"


# ----------------------------------------------------------------------------------------------
# Timing and report.

def _stats(values):
    values = np.asarray(values, np.float64)
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "min": float(values.min()), "max": float(values.max()),
            "iqr": float(q3 - q1)}


def _timed_call(step, state, next_batch):
    """One call of ``step`` on ``next_batch()``, forced to the host with ``float(loss)``:
    ``(state, loss, input wait in s, whole call in s)``."""
    start = time.perf_counter()
    batch = next_batch()
    got = time.perf_counter()
    state, metrics = step(state, batch)
    loss = float(metrics["loss"])
    return state, loss, got - start, time.perf_counter() - start


def time_steps(step, state, next_batch, steps, warmup, profile_dir=None):
    """Run ``step`` ``warmup + steps`` times, each forced to the host with ``float(loss)``.

    Returns a dict: ``first_call_s`` (the first call: trace + compile + run), ``warmup_s`` (the
    other warm-up calls), ``step_s`` (stats of the timed steps, input wait included) and
    ``input_wait_s`` (stats of the time spent in ``next_batch()``), ``stalled_steps`` (steps whose
    wait exceeded ``STALL_FRACTION`` of the step), ``loss``. With ``profile_dir``, three more steps
    run under the TensorFlow profiler.
    """
    def one(state):
        return _timed_call(step, state, next_batch)

    logging.info("first call: trace + compile + run")
    state, loss, _, first = one(state)
    logging.info("first call took %.2f s; %d more warm-up call(s)", first, warmup - 1)
    start = time.perf_counter()
    for _ in range(warmup - 1):
        state, loss, _, _ = one(state)
    warm = time.perf_counter() - start
    waits, times = [], []
    report_every = max(1, steps // 5)
    for i in range(steps):
        state, loss, wait, took = one(state)
        waits.append(wait)
        times.append(took)
        if (i + 1) % report_every == 0 or i + 1 == steps:
            logging.info("timed step %d/%d: %.2f ms (loss %.4f)", i + 1, steps, took * 1e3, loss)
    if profile_dir:
        logging.info("profiling 3 more steps into %s", profile_dir)
        tf.profiler.experimental.start(profile_dir)
        for _ in range(3):
            state, _, _, _ = one(state)
        tf.profiler.experimental.stop()
    stalled = sum(w > STALL_FRACTION * t for w, t in zip(waits, times))
    return {"first_call_s": first, "warmup_s": warm, "step_s": _stats(times),
            "input_wait_s": _stats(waits), "stalled_steps": int(stalled), "loss": loss}


def run_benchmark(family, build_step, flag_values=FLAGS):
    """The benchmark of one configuration; prints the table and, with ``--json``, a JSON line.

    ``build_step(config, jit_compile, strategy) -> (step, state, flops_per_step, algorithm)``
    builds the family's step ``step(state, batch) -> (state, {'loss', ...})`` (split over
    ``strategy``'s replicas unless it is ``None``), its initial state, the analytic FLOPs of one
    step (``functional_meta.flops``) and a dict of algorithm settings to report.
    Returns the record (the JSON line's content).
    """
    fv = flag_values
    strategy = make_strategy(fv.strategy, fv.logical_cpus)   # before any other TensorFlow op
    config = config_from_flags(family, fv)
    device = choose_device(fv.device)
    mode = fv.mode or default_mode(family, device)
    with tf.device("/GPU:0" if device == "gpu" else "/CPU:0"):
        next_batch, input_kind = input_batches(config, fv.data, fv.data_path, fv.seed)
        logging.info("reference matmul on %s", device)
        matmul, matmul_size = matmul_flops_per_s(device)
        reset_peak_memory(device)
        step, state, flops_per_step, algorithm = build_step(config, mode == "xla", strategy)
        tf.config.run_functions_eagerly(mode == "eager")
        try:
            timing = time_steps(step, state, next_batch, fv.steps, fv.warmup, fv.profile_dir)
        finally:
            tf.config.run_functions_eagerly(False)
        memory, memory_kind = peak_memory(device)
    median = timing["step_s"]["median"]
    record = {
        "benchmark": family, "preset": fv.preset,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "algorithm": algorithm, "mode": mode, "device": device, "device_name": device_name(device),
        "tf_version": tf.__version__, "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "data": fv.data, "input": input_kind,
        "strategy": fv.strategy, "replicas": strategy.num_replicas_in_sync if strategy else 1,
        "steps": fv.steps, "warmup": fv.warmup, **timing,
        **({"input_wait_s": None, "stalled_steps": 0} if fv.data == "synthetic" else {}),
        "stalled": fv.data != "synthetic" and timing["stalled_steps"] > 0,
        "flops_per_step": flops_per_step, "achieved_flops_per_s": flops_per_step / median,
        "matmul_flops_per_s": matmul, "matmul_size": matmul_size,
        "peak_memory_bytes": memory, "peak_memory_kind": memory_kind,
        "profile_dir": fv.profile_dir,
    }
    record["tasks_per_s"], _ = throughput(record)
    print(format_report(record))
    if fv.json:
        print(json.dumps(record), flush=True)
    return record


def _si(value, unit):
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def throughput(r):
    """``(per_second, unit)`` of a record with ``config`` and ``step_s``: the meta-batch over the
    median step, in tasks (MAML) or episodes (ProtoNet)."""
    unit = "episodes" if r["config"]["family"] == "protonet" else "tasks"
    return r["config"]["meta_batch"] / r["step_s"]["median"], unit


def timing_rows(r, first_call_note="trace + compile + run"):
    """The first-call, step-time and throughput rows of a record with ``config``,
    ``first_call_s``, ``step_s``, ``steps`` and ``warmup`` (``time_steps``)."""
    s, ms = r["step_s"], 1e3
    per_s, unit = throughput(r)
    note = f" ({first_call_note})" if first_call_note else ""
    return [
        ("first call", f"{r['first_call_s']:.2f} s{note}"),
        ("step time", f"median {s['median'] * ms:.2f} ms  min {s['min'] * ms:.2f}  "
                      f"max {s['max'] * ms:.2f}  IQR {s['iqr'] * ms:.2f} ms  "
                      f"({r['steps']} steps after {r['warmup']} warm-up)"),
        ("throughput", f"{per_s:.2f} {unit}/s"),
    ]


# Calls of each step in a row in ``time_interleaved``.
INTERLEAVE_ROUND = 3


def time_interleaved(runs, next_batch, steps, warmup, per_round=INTERLEAVE_ROUND):
    """Time several steps against each other on a machine whose speed drifts between runs.

    ``runs`` maps a name to ``(step, state)``. Each step makes its first call and warm-up calls,
    then all take turns, ``per_round`` calls at a time (who goes first rotates every round), until
    each has made ``steps`` timed calls: a drift of the machine's speed then hits all of them
    alike. Returns ``{name: timing}`` with ``time_steps``' ``first_call_s``, ``step_s``, ``loss``.
    """
    states = {name: state for name, (_, state) in runs.items()}

    def one(name):
        states[name], loss, _, took = _timed_call(runs[name][0], states[name], next_batch)
        return loss, took

    first, times, losses = {}, {name: [] for name in runs}, {}
    for name in runs:
        logging.info("%s: first call (trace + compile + run) and warm-up", name)
        losses[name], first[name] = one(name)
        for _ in range(warmup - 1):
            losses[name], _ = one(name)
    names = list(runs)
    for r in range(-(-steps // per_round)):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for _ in range(min(per_round, steps - len(times[name]))):
                losses[name], took = one(name)
                times[name].append(took)
    return {name: {"first_call_s": first[name], "step_s": _stats(times[name]),
                   "loss": losses[name]} for name in runs}


def report_reference(benchmark, header, config, timing, first_call_note=None, more_rows=(),
                     **extra):
    """The record of a reference binary's run (fm-torch-reference, fm-tf-reference): printed as
    ``header`` over the timing rows and ``more_rows``, and as a JSON line with ``--json``;
    ``extra`` fields are added to it. ``timing`` is ``time_steps``' result."""
    record = {"benchmark": benchmark, "preset": FLAGS.preset, "config": config, **extra,
              "steps": FLAGS.steps, "warmup": FLAGS.warmup,
              **{k: timing[k] for k in ("first_call_s", "step_s", "loss")}}
    per_s, unit = throughput(record)
    record[f"{unit}_per_s"] = per_s
    print(header + "\n" + format_rows(timing_rows(record, first_call_note) + list(more_rows)),
          flush=True)
    if FLAGS.json:
        print(json.dumps(record), flush=True)
    return record


def format_rows(rows):
    """``(name, text)`` rows as the benchmarks print them: names right-aligned."""
    return "\n".join(f"{name:>13}  {text}" for name, text in rows)


def format_report(r):
    """The human-readable table of a benchmark record."""
    c, ms = r["config"], 1e3
    shape = "x".join(map(str, c["image_shape"]))
    net = (f"conv4 {c['channels']} ch {c['pool']}" if c["net"] == "conv4"
           else f"mlp {'-'.join(map(str, c['hidden']))}")
    algo = ", ".join(f"{k}={v}" for k, v in r["algorithm"].items())
    wait = r["input_wait_s"]
    rows = [
        ("benchmark", f"{r['benchmark']}  preset={r['preset']}  mode={r['mode']}"),
        ("device", f"{r['device']}: {r['device_name']}  (TensorFlow {r['tf_version']}, "
                   f"TF_ENABLE_ONEDNN_OPTS={r['onednn']}, XLA_FLAGS={r['xla_flags']})"),
        ("network", f"{net}, input {shape}"),
        ("episodes", f"{c['n_way']}-way {c['k_shot']}-shot {c['q_query']}-query, "
                     f"meta-batch {c['meta_batch']}"),
        ("algorithm", algo),
        *timing_rows(r),
        ("FLOPs/step", f"{_si(r['flops_per_step'], 'FLOP')} (analytic, functional_meta.flops)"),
        ("achieved", f"{_si(r['achieved_flops_per_s'], 'FLOP/s')} = "
                     f"{100 * r['achieved_flops_per_s'] / r['matmul_flops_per_s']:.1f}% of "
                     f"dense matmul"),
        ("dense matmul", f"{_si(r['matmul_flops_per_s'], 'FLOP/s')} "
                         f"({r['matmul_size']}^2 float32, same device, same run)"),
        ("peak memory", f"{r['peak_memory_bytes'] / 2 ** 20:.1f} MiB ({r['peak_memory_kind']})"),
        ("input", r["input"] if wait is None else
         f"{r['input']}: wait median {wait['median'] * ms:.2f} ms, max {wait['max'] * ms:.2f} ms,"
         f" stalled {'YES' if r['stalled'] else 'no'} ({r['stalled_steps']}/{r['steps']} steps "
         f"waited > {STALL_FRACTION:.0%})"),
        ("final loss", f"{r['loss']:.4f}"),
    ]
    if r["profile_dir"]:
        rows.append(("profile", f"{r['profile_dir']} (tensorboard --logdir {r['profile_dir']})"))
    return format_rows(rows)
