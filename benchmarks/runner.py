"""The benchmark runner shared by ``maml_bench`` and ``protonet_bench`` (which differ only in
``build_step``), and its parts the reference binaries reuse: inputs, devices (the timing is
``benchmarks.timing``'s).

Method of ``run_benchmark(family, build_step)``:

1. Input: ``--data=synthetic`` puts one random batch on the device and reuses it (pure step
   time); any other source is loaded, checked and served by a prefetching ``tf.data`` pipeline.
2. Reference: dense float32 matmul FLOP/s on the same device, in the same process.
3. Warm-up: the first call (trace + compile + run) is timed and reported on its own, then
   ``--warmup - 1`` more untimed calls.
4. ``--steps`` timed steps, each ending with ``float(metrics['loss'])`` so the device has finished;
   a step's time includes waiting for its input, which is also timed on its own (a step *stalls*
   when that wait is over ``report.STALL_FRACTION`` of it).
5. Report (``benchmarks.report``): median, min, max and IQR of the step time; tasks/s =
   meta_batch / median; achieved FLOP/s = analytic FLOPs per step (``functional_meta.flops``) /
   median; peak memory (GPU allocator peak from after the reference matmul, or on CPU the
   process's peak RSS).
"""

import json
import math
import os
import platform
import resource
import time

import numpy as np
import tensorflow as tf
from absl import app, logging

from benchmarks import report
from benchmarks.flag_groups import FLAGS, config_from_flags
from benchmarks.timing import stats, time_steps, timed_call
from functional_meta import data as data_lib
from functional_meta import devices, distribute, episodes


# ----------------------------------------------------------------------------------------------
# Input.

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
    """``'xla'`` where ``devices.default_jit`` compiles ``family``'s step for ``device``'s kind,
    else ``'function'``."""
    with devices.target(device):
        return "xla" if devices.default_jit(family) else "function"


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
    # The step is traced (its first call) inside both blocks: the device's choices and the
    # products' precision (functional_meta.devices).
    with tf.device("/GPU:0" if device == "gpu" else "/CPU:0"), devices.precision(fv.precision):
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
        "precision": fv.precision,
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
    record["tasks_per_s"], _ = report.throughput(record)
    print(report.format_report(record))
    if fv.json:
        print(json.dumps(record), flush=True)
    return record


def _traced_for(kind, step):
    """``step``'s compiled function, traced (and called) for device kind ``kind``."""
    function = getattr(step, "compiled", step)

    def call(*args):
        with devices.target(kind):
            return function(*args)
    return call


def export_benchmark(family, build_step, flag_values=FLAGS):
    """``--export_hlo``: the configuration's XLA-compiled step, traced for ``--export_target``
    with ``--precision`` (``functional_meta.devices``), called once on its first batch and written to ``--export_hlo``
    (``functional_meta.export``) instead of timed; prints a summary and, with ``--json``, a JSON
    line. Returns the manifest."""
    from functional_meta import export
    fv = flag_values
    os.makedirs(fv.export_hlo, exist_ok=True)               # a bad folder fails before compiling
    config = config_from_flags(family, fv)
    device = choose_device(fv.device)
    target = fv.export_target or device
    with tf.device("/GPU:0" if device == "gpu" else "/CPU:0"), devices.target(target), \
            devices.precision(fv.precision):
        next_batch, input_kind = input_batches(config, fv.data, fv.data_path, fv.seed)
        step, state, flops_per_step, algorithm = build_step(config, True, None)
        logging.info("exporting the step, traced for %s, to %s", target, fv.export_hlo)
        record = {"family": family, "preset": fv.preset, **config, "algorithm": algorithm,
                  "precision": fv.precision, "data": fv.data, "input": input_kind,
                  "seed": fv.seed, "flops_per_step": flops_per_step}
        reference = True            # float64 outputs from the form this machine runs fast:
        if target != device:
            with devices.target(device):
                reference = _traced_for(device, build_step(config, True, None)[0])
        manifest = export.write(fv.export_hlo, step, state, next_batch(), config=record,
                                target=target, reference=reference)
    sizes = {v: info["proto_bytes"] for v, info in manifest["variants"].items()}
    print(report.format_rows([
        ("export", f"{fv.export_hlo}: {family} preset={fv.preset}, traced for {target}, "
                   f"run here on {device}"),
        ("arguments", f"{len(manifest['args'])} (inputs.npz), outputs {len(manifest['outputs'])} "
                      f"(outputs.npz, TensorFlow {tf.__version__})"),
        ("HLO", ", ".join(f"{v} {n / 1024:.0f} KiB" for v, n in sizes.items()) +
                f"; custom calls: {manifest['variants']['default']['custom_calls'] or 'none'}"),
        ("loss", f"{manifest['loss']:.6f} (first call {manifest['tf_first_call_s']:.2f} s: "
                 f"trace + compile + run)"),
    ]), flush=True)
    if fv.json:
        print(json.dumps({k: v for k, v in manifest.items() if k not in ("args", "outputs")}),
              flush=True)
    return manifest


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
        states[name], loss, _, took = timed_call(runs[name][0], states[name], next_batch)
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
    return {name: {"first_call_s": first[name], "step_s": stats(times[name]),
                   "loss": losses[name]} for name in runs}
