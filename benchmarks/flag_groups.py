"""The flag groups of the benchmark binaries, and how a binary parses and shows them.

Flags come in groups, each defined by one function so any binary takes the groups it needs:
``define_model_flags`` (preset and network), ``define_episode_flags`` (way, shot, query,
meta-batch), ``define_maml_flags`` / ``define_protonet_flags`` (the algorithm),
``define_data_flags``, ``define_device_flags``, ``define_benchmark_flags`` and
``define_export_flags``. Every model, episode and algorithm flag defaults to ``None``, meaning
"the preset's value"; ``config_from_flags`` resolves the preset with the flags that were given.
Each function takes ``flag_values`` (default: the global ``FLAGS``), so a sweep can parse and
validate a binary's flags into a private ``flags.FlagValues`` without running it (``parse_flags``).

Bad flags fail while parsing, before anything compiles: per-flag bounds and choices, and a
validator on ``--preset`` that resolves the whole configuration and builds (but does not run) its
network. Checks that need the data (ways against classes, shots against images per class) run in
``runner.input_batches`` right after loading, still before the first step.

This module does not import TensorFlow, so that ``--help`` and a mistyped flag answer at once.
"""

import os
import sys

from absl import app, flags

import benchmarks
from functional_meta import choices, devices, presets

FLAGS = flags.FLAGS

DEFAULT_PRESET = {"maml": "maml_omniglot_5way", "protonet": "protonet_omniglot"}
MODES = ("xla", "function", "eager")
# --data of the benchmarks: 'synthetic' is one fixed random batch kept on the device (no input
# pipeline, pure step time); 'synthetic_classes' is data.load('synthetic') through the same
# episode pipeline as real data; 'sinusoid' the sinusoid regression task pipeline.
BENCH_DATA = ("synthetic", "synthetic_classes", "sinusoid",
              *(s for s in choices.IMAGE_SOURCES if s != "synthetic"))
NEEDS_PATH = ("omniglot", "mnist", "folder")
# Model/episode/algorithm flags that override a preset field of the same name.
OVERRIDES = ("net", "channels", "pool", "image_shape", "hidden", "n_way", "k_shot", "q_query",
             "meta_batch", "inner_steps", "inner_lr", "outer_lr")


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
    flags.DEFINE_enum("net", None, [*presets.IMAGE_NETS, "mlp"], "Network (default: the "
                      "preset's): conv4, resnet12 (ResNet-12 of MetaOptNet/TADAM, "
                      "functional_meta.nets.resnet12) or mlp.", flag_values=fv)
    flags.DEFINE_integer("channels", None, "conv4: filters per block; resnet12: the first "
                         "block's width, the blocks being (c, 5c/2, 5c, 10c): 64 gives the "
                         "published 64-160-320-640, 32 a narrower 32-80-160-320.",
                         lower_bound=1, flag_values=fv)
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
        benchmarks.start_tensorflow()           # the network is built: TensorFlow is needed
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
    flags.DEFINE_enum("inner_loop", "auto", ["auto", "unrolled", "looped"], "How the inner "
                      "steps are compiled: unrolled (each step traced; TensorFlow differentiates "
                      "the unrolled graph), looped (one loop whose backward pass is a loop of "
                      "Hessian-vector products over the stored per-step weights: compile time and "
                      "memory flat in the steps, the same exact second-order meta-gradient), or "
                      "auto (looped from 3 inner steps on).", flag_values=fv)
    flags.DEFINE_bool("recompute", False, "Unrolled inner loops: recompute the inner steps' "
                      "activations in the backward pass instead of storing them (a looped inner "
                      "loop stores only the per-step weights already).", flag_values=fv)
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
    from functional_meta import training
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
                inner_loop=fv.inner_loop,
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
    flags.DEFINE_enum("strategy", "none", list(choices.STRATEGIES),
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


def define_precision_flags(flag_values=FLAGS):
    """``--precision``: the inputs of the network's matrix products and convolutions."""
    flags.DEFINE_enum("precision", "float32", list(devices.PRECISIONS),
                      "Inputs of the network's matrix products and convolutions. float32; or "
                      "bfloat16: rounded to bfloat16 and multiplied with float32 accumulation, "
                      "each result rounded to bfloat16 and cast back to float32 (batch-norm "
                      "statistics, losses and the optimiser stay float32; meta-gradients move "
                      "by several percent). float32 on CPU and GPU unless set "
                      "(functional_meta.devices; docs/design.md, device choices).",
                      flag_values=flag_values)


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


def define_export_flags(flag_values=FLAGS):
    """``--export_hlo``: write the compiled step for other XLA runtimes instead of timing it."""
    fv = flag_values
    flags.DEFINE_string("export_hlo", None, "Instead of timing: call the XLA-compiled step once "
                        "on the first batch and write it to this folder (functional_meta.export): "
                        "its HLO before XLA's optimisation (proto and text; also a variant with "
                        "every dot at float32 precision HIGHEST), its inputs in HLO parameter "
                        "order (inputs.npz), TensorFlow's outputs (outputs.npz) and "
                        "manifest.json. fm-xla-replay compiles and checks it with JAX.",
                        flag_values=fv)
    flags.DEFINE_enum("export_target", None, list(devices.KINDS), "--export_hlo: the device kind "
                      "the step is traced for, whatever this machine has (functional_meta."
                      "devices: e.g. gpu gives grouped convolutions and no kernel-gradient "
                      "barriers). Default: the device the step would run on here.",
                      flag_values=fv)

    def check_export(values):
        if values["export_hlo"] is None:
            if values["export_target"] is not None:
                raise flags.ValidationError("--export_target applies to --export_hlo only")
            return True
        if values["strategy"] != "none":
            raise flags.ValidationError("--export_hlo exports the single-device step: leave "
                                        f"--strategy=none, not {values['strategy']}")
        if values["mode"] not in (None, "xla"):
            raise flags.ValidationError("--export_hlo exports the XLA-compiled step: leave "
                                        f"--mode unset or xla, not {values['mode']}")
        if os.path.exists(values["export_hlo"]) and not os.path.isdir(values["export_hlo"]):
            raise flags.ValidationError(f"--export_hlo={values['export_hlo']} is a file, not a "
                                        "folder")
        return True
    flags.register_multi_flags_validator(["export_hlo", "export_target", "strategy", "mode"],
                                         check_export,
                                         flag_values=fv)


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
    define_precision_flags(flag_values)
    define_benchmark_flags(flag_values)
    define_export_flags(flag_values)


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
    a console script is the generated wrapper, not ``module_name``). ``main`` imports
    TensorFlow (``benchmarks.start_tensorflow``) once it has checked what it can without it."""
    module = sys.modules[module_name]
    for flag in FLAGS.get_key_flags_for_module(module):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    sys.modules["__main__"].__doc__ = module.__doc__
    app.run(main)


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
    if config["net"] == "resnet12" and "channels" not in config:
        raise ValueError(f"--net=resnet12 needs --channels (preset {config['name']} has none)")
    if config["net"] == "resnet12" and _value(fv, "pool") is not None:
        raise ValueError("--pool is conv4's downsampling; --net=resnet12 max-pools after every "
                         "block")
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

