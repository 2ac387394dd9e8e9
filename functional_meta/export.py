"""Export a compiled step with its arguments, so that any XLA runtime can compile, run and check
the very step the library runs: the XLA program, the inputs it was called with, and TensorFlow's
outputs.

An export is a folder (``FORMAT`` 1):

- ``step.hlo.pb.gz``, ``step.hlo.txt.gz``: the step's ``HloModuleProto`` before XLA's optimisation
  (the optimised form is specific to one machine), serialized and as text. Its dots carry no
  precision setting, as TensorFlow emits them: an NVIDIA GPU may run their float32 products as
  TF32, as TensorFlow would there.
- ``step_fp32.hlo.pb.gz``, ``step_fp32.hlo.txt.gz``: the same lowered with TF32 off, so that
  every dot says ``precision HIGHEST`` (full float32 products on any device).
- ``inputs.npz``: the flattened ``(state, batch)`` arguments in HLO parameter order, ``a000``,
  ``a001``, ...
- ``outputs.npz``: TensorFlow's outputs of ``step(state, batch)`` on those inputs, flattened in
  the HLO's output order (the new state, then the metrics), ``o000``, ...
- ``outputs64.npz`` (when the step also runs in float64): the same step on the same inputs in
  float64, a reference for how far float32 itself is from the exact step. A replay is held to
  TensorFlow's own float32 error, not only to a fixed tolerance: where float32 is ill-conditioned
  (early layers' gradients in a 60-way ProtoNet episode), two correct float32 programs differ.
- ``manifest.json``: every argument's and output's name (its path in the structure, e.g.
  ``state/weights/0``, ``batch/1``, ``metrics/loss``), shape and dtype; checksums of the outputs;
  the loss's output index; the configuration; the TensorFlow version.

``write`` needs TensorFlow; ``read`` and ``hlo`` need numpy only, so that a machine without
TensorFlow (a GPU with JAX, ``benchmarks/xla_replay.py``; the PyTorch reference) can use an
export. The program is the graph as traced on the exporting machine, for the device kind it was
traced for (``functional_meta.devices``).

Example::

    step = maml.make_train_step(apply, inner_steps=1, task_chunk=8)
    export.write("/tmp/config_a", step, state, batch, config={"meta_batch": 32})
    exp = export.read("/tmp/config_a")      # exp.manifest, exp.inputs, exp.outputs
"""

import gzip
import hashlib
import json
import os
import platform
import re
import time
from typing import NamedTuple

import numpy as np

FORMAT = 1
# Variant -> file prefix. 'default': dots as TensorFlow emits them; 'fp32': TF32 off.
VARIANTS = {"default": "step", "fp32": "step_fp32"}
MANIFEST, INPUTS, OUTPUTS = "manifest.json", "inputs.npz", "outputs.npz"
REFERENCE = "outputs64.npz"


class Export(NamedTuple):
    """An export read back: its folder, manifest, and input and expected output arrays in the
    HLO's parameter and output order."""
    path: str
    manifest: dict
    inputs: list
    outputs: list
    reference: list = None      # the float64 outputs (``REFERENCE``), when the export has them


def flatten_with_names(structure, prefix):
    """``[(name, leaf)]`` in ``tf.nest.flatten``'s order (dicts by sorted key, sequences in
    order), each name the ``/``-joined path under ``prefix``."""
    if isinstance(structure, dict):
        return [item for key in sorted(structure)
                for item in flatten_with_names(structure[key], f"{prefix}/{key}")]
    if isinstance(structure, (list, tuple)):
        return [item for i, part in enumerate(structure)
                for item in flatten_with_names(part, f"{prefix}/{i}")]
    return [(prefix, structure)]


def checksum(array):
    """Sum, absolute sum and L2 norm of ``array`` in float64: a check of an output when the
    expected arrays are not at hand."""
    a = np.asarray(array, np.float64)
    return {"sum": float(a.sum()), "abs_sum": float(np.abs(a).sum()),
            "l2": float(np.sqrt(np.square(a).sum()))}


def _opcodes(text):
    """``{opcode: count}`` over the instructions of an HLO text module."""
    counts = {}
    instruction = r"^\s*(?:ROOT )?%?\S+ = \S+(?:\[[^\]]*\])?(?:\{[^}]*\})? ([a-z][a-z0-9-]*)\("
    for op in re.findall(instruction, text, flags=re.M):
        counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _spec(name, array):
    return {"name": name, "shape": list(array.shape), "dtype": array.dtype.name}


def _float64_outputs(function, args, names):
    """The step's outputs on ``args`` with every float32 tensor widened to float64, in ``names``'
    order; ``(None, reason)`` when the step does not run in float64."""
    import tensorflow as tf
    wide = tf.nest.map_structure(
        lambda t: tf.cast(t, tf.float64) if t.dtype == tf.float32 else t, args)
    try:
        new_state, metrics = function(*wide)
    except (tf.errors.OpError, TypeError, ValueError) as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    found = dict(flatten_with_names(new_state, "state") + flatten_with_names(metrics, "metrics"))
    return [np.asarray(found[name], np.float64) for name in names], None


def write(path, step, state, batch, *, config=None, target=None, reference=True):
    """Export ``step(state, batch) -> (state, metrics)`` called on ``(state, batch)`` into folder
    ``path`` (created; existing export files are replaced); returns the manifest.

    ``step`` is a ``tf.function(jit_compile=True)``, or a library step that exposes one as
    ``step.compiled`` (ProtoNet's). ``metrics`` must hold ``loss``. ``config`` (JSON-able) and
    ``target`` (the device kind the step was traced for) are recorded in the manifest. With
    ``reference``, the step also runs once in float64 (``REFERENCE``; a second compile), or, when
    ``reference`` is a callable, that step of the same arguments does (e.g. the same step traced
    for the exporting machine's device, where the exported form runs slowly there). Raises
    ``ValueError`` when the step is not XLA-compiled or captures tensors (they would be HLO
    parameters outside the arguments).
    """
    import tensorflow as tf
    function = getattr(step, "compiled", step)
    if not hasattr(function, "experimental_get_compiler_ir"):
        raise ValueError(f"step must be a tf.function, got {type(step).__name__}")
    if not getattr(function, "_jit_compile", True):
        raise ValueError("step must be compiled with jit_compile=True to be exported as HLO")
    args = tf.nest.map_structure(tf.convert_to_tensor, (state, tuple(batch)))
    named_in = flatten_with_names(args[0], "state") + flatten_with_names(args[1], "batch")
    concrete = function.get_concrete_function(*args)
    if concrete.captured_inputs:
        raise ValueError(f"the step captures {len(concrete.captured_inputs)} tensors; pass them "
                         "as arguments so that they are HLO parameters")
    start = time.perf_counter()
    new_state, metrics = function(*args)
    named_out = flatten_with_names(new_state, "state") + flatten_with_names(metrics, "metrics")
    outputs = [np.asarray(t) for _, t in named_out]     # forces the run to finish
    first_call_s = time.perf_counter() - start
    if "loss" not in metrics:
        raise ValueError(f"the step's metrics {sorted(metrics)} hold no 'loss'")
    os.makedirs(path, exist_ok=True)
    ir = function.experimental_get_compiler_ir(*args)
    variants = {}
    tf32 = tf.config.experimental.tensor_float_32_execution_enabled()
    try:
        for variant, prefix in VARIANTS.items():
            tf.config.experimental.enable_tensor_float_32_execution(variant == "default")
            proto, text = ir(stage="hlo_serialized"), ir(stage="hlo")
            for suffix, data in ((".hlo.pb.gz", proto), (".hlo.txt.gz", text.encode())):
                with gzip.open(os.path.join(path, prefix + suffix), "wb") as f:
                    f.write(data)
            variants[variant] = {
                "files": [prefix + ".hlo.pb.gz", prefix + ".hlo.txt.gz"],
                "sha256": hashlib.sha256(proto).hexdigest(), "proto_bytes": len(proto),
                "dots": len(re.findall(r" dot\(", text)),
                "dots_highest": text.count("operand_precision={highest,highest}"),
                "custom_calls": sorted(set(re.findall(r'custom_call_target="([^"]+)"', text))),
                "opcodes": _opcodes(text)}
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(tf32)
    inputs = [np.asarray(t) for _, t in named_in]
    np.savez(os.path.join(path, INPUTS), **{f"a{i:03d}": a for i, a in enumerate(inputs)})
    np.savez(os.path.join(path, OUTPUTS), **{f"o{i:03d}": a for i, a in enumerate(outputs)})
    names = [name for name, _ in named_out]
    function64 = function if reference is True else getattr(reference, "compiled", reference)
    wide, no_reference = _float64_outputs(function64, args, names) if reference \
        else (None, "not asked for")
    if wide is not None:
        np.savez(os.path.join(path, REFERENCE), **{f"o{i:03d}": a for i, a in enumerate(wide)})
    elif os.path.exists(os.path.join(path, REFERENCE)):
        os.remove(os.path.join(path, REFERENCE))
    manifest = {
        "format": FORMAT, "tf_version": tf.__version__, "host": platform.node(),
        "target": target, "config": config or {}, "variants": variants,
        "args": [_spec(name, a) for (name, _), a in zip(named_in, inputs)],
        "outputs": [{**_spec(name, a), **checksum(a)} for name, a in zip(names, outputs)],
        "loss_index": names.index("metrics/loss"),
        "state_outputs": sum(name.startswith("state/") for name in names),
        "loss": float(outputs[names.index("metrics/loss")]),
        "tf_first_call_s": first_call_s,
        "reference64": wide is not None, "no_reference64": no_reference,
    }
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def read(path):
    """The ``Export`` in folder ``path`` (numpy only); ``ValueError`` naming the file when it is
    not a complete export of this format."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise ValueError(f"{path} is not an export: it has no {MANIFEST}")
    with open(manifest_path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path}: format {manifest.get('format')!r}, this reader "
                         f"reads format {FORMAT}")
    arrays = []
    for name, key, specs in ((INPUTS, "a", manifest["args"]), (OUTPUTS, "o", manifest["outputs"])):
        with np.load(os.path.join(path, name)) as stored:
            found = [stored[f"{key}{i:03d}"] for i in range(len(specs))]
        for array, spec in zip(found, specs):
            if list(array.shape) != spec["shape"] or array.dtype.name != spec["dtype"]:
                raise ValueError(f"{os.path.join(path, name)}: {spec['name']} is "
                                 f"{array.dtype.name}{list(array.shape)}, the manifest says "
                                 f"{spec['dtype']}{spec['shape']}")
        arrays.append(found)
    reference = None
    if manifest.get("reference64"):
        with np.load(os.path.join(path, REFERENCE)) as stored:
            reference = [stored[f"o{i:03d}"] for i in range(len(manifest["outputs"]))]
    return Export(path, manifest, *arrays, reference=reference)


def hlo(export, variant="default", form="proto"):
    """The HLO module of ``variant`` (``VARIANTS``): ``bytes`` of the ``HloModuleProto`` for
    ``form='proto'``, ``str`` for ``form='text'``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    suffix = {"proto": ".hlo.pb.gz", "text": ".hlo.txt.gz"}[form]
    with gzip.open(os.path.join(export.path, VARIANTS[variant] + suffix), "rb") as f:
        data = f.read()
    return data if form == "proto" else data.decode()


def named(export, prefix, arrays=None):
    """``{name: array}`` of the inputs (or ``arrays``, e.g. the outputs, with the matching specs)
    whose name starts with ``prefix``: ``named(exp, 'state/weights/')`` are the weights."""
    specs = export.manifest["args"] if arrays is None else export.manifest["outputs"]
    arrays = export.inputs if arrays is None else arrays
    return {s["name"]: a for s, a in zip(specs, arrays) if s["name"].startswith(prefix)}
