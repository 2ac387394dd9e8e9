"""Compile an exported step (fm-maml-bench / fm-protonet-bench --export_hlo) with JAX's XLA, check
it against TensorFlow's outputs and time it: the library's compiled step on any device JAX
reaches, without TensorFlow (a GPU machine with JAX only, an XLA bug report).

  fm-xla-replay --from_export=/tmp/config_a                   # JAX's default backend
  fm-xla-replay --from_export=/tmp/config_a --variant=fp32 --calls=50

The HLO is converted to StableHLO (``jax.extend.mlir.hlo_to_stablehlo``), compiled for the
default backend's first device and run on the export's inputs. Every output must agree with
TensorFlow's: max |replay - TensorFlow| <= tolerance x the largest magnitude of TensorFlow's
outputs in its group (all weights, all Adam first moments, ...; ``--tolerance``, by default 1e-4
on a CPU, on a GPU 1e-3 for ``--variant=fp32`` and 3e-2 for the default variant, whose float32
products may run as TF32), or, when larger and the export holds the step's float64 outputs,
three times TensorFlow's own float32 error against them (``TF_ERROR_FACTOR``): a replay as
accurate as TensorFlow's float32 step is within twice that error of it. Weights whose first
Adam step rounding decides (a gradient within the tolerance of zero, or near Adam's epsilon)
are left out of that check and counted. Then ``--warmup`` untimed and ``--calls`` timed calls,
each call's new state fed to the next as in the benchmarks, each forced to the host with
``float(loss)`` (``benchmarks.timing``). Prints one JSON object as the last line of stdout; the
exit status is 2 when an output disagrees.

What it times is XLA on the library's graph (as traced for the export's target device), not
TensorFlow's runtime. Needs JAX: ``pip install -e '.[replay]'`` (``jax[cuda13]`` for a GPU).
"""

import json
import resource
import time

import numpy as np
from absl import app, flags

from benchmarks import flag_groups, report, timing
from functional_meta import export        # numpy only for reading

FLAGS = flags.FLAGS
# --tolerance by default: {(platform is cpu, variant): relative tolerance}.
TOLERANCE = {"cpu": 1e-4, "fp32": 1e-3, "default": 3e-2}
# An output may differ from TensorFlow's by this many times TensorFlow's float32 error.
TF_ERROR_FACTOR = 3


def define_flags():
    """The binary's flags, defined when it runs (tests import it beside other binaries)."""
    flags.DEFINE_string("from_export", None, "Export folder (--export_hlo of fm-maml-bench or "
                        "fm-protonet-bench).")
    flags.DEFINE_enum("variant", "default", list(export.VARIANTS),
                      "default: the HLO as TensorFlow emits it (float32 products may run as TF32 "
                      "on an NVIDIA GPU); fp32: every dot at precision HIGHEST.")
    flags.DEFINE_integer("calls", 20, "Timed calls.", lower_bound=1)
    flags.DEFINE_integer("warmup", 3, "Untimed calls after the first (which is reported apart).",
                         lower_bound=1)
    flags.DEFINE_float("tolerance", None, "Largest difference allowed per output, max|replay - "
                       "TF| / (max|TF| over the output's group); default: 1e-4 on a CPU, on a GPU "
                       "1e-3 for --variant=fp32 and 3e-2 for the default variant (TF32 products).",
                       lower_bound=0.0)
    flags.mark_flag_as_required("from_export")

    def check_export(path):
        try:
            export.read(path)
        except (OSError, ValueError) as error:
            raise flags.ValidationError(f"--from_export: {error}")
        return True
    flags.register_validator("from_export", check_export)


def _jax():
    try:
        import jax
    except ImportError as error:
        raise ImportError("fm-xla-replay needs JAX: pip install -e '.[replay]'") from error
    jax.config.update("jax_enable_x64", True)     # the step's int64 Adam count stays int64
    return jax


def compile_export(exp, variant="default"):
    """``(run, device, info)``: the export's HLO compiled for JAX's default backend, ``run(args)
    -> list of device arrays`` taking and returning them in the HLO's order, the device, and the
    conversion and compile times."""
    _jax()
    import jax.extend.backend as jax_backend
    import jax.extend.mlir as jax_mlir
    from jax._src.lib import xla_client
    start = time.perf_counter()
    module = jax_mlir.hlo_to_stablehlo(export.hlo(exp, variant))
    converted = time.perf_counter()
    backend = jax_backend.get_backend()
    device = backend.local_devices()[0]
    options = jax_backend.get_compile_options(num_replicas=1, num_partitions=1)
    executable = backend.compile_and_load(module, xla_client.DeviceList((device,)), options)
    info = {"convert_s": converted - start, "compile_s": time.perf_counter() - converted}
    memory = executable.get_compiled_memory_stats()
    info["compiled_temp_bytes"] = getattr(memory, "temp_size_in_bytes", None)

    def run(args):
        results = executable.execute_sharded(list(args))
        return [parts[0] for parts in results.disassemble_into_single_device_arrays()]
    return run, device, info


def _group(name):
    """Outputs scaled together: a list's tensors (``state/weights/3`` -> ``state/weights``)."""
    head, _, last = name.rpartition("/")
    return head if last.isdigit() and head else name


def compare(outputs, exp, tolerance):
    """``({output name: max|out - TF| / scale}, {output name: allowed}, undetermined)``: the
    scale of an output is the largest magnitude of TensorFlow's outputs in its group (all
    weights, all first moments, ...).

    Adam's first step (the exported state's count ``state/opt/0`` is 0) moves a weight by the
    learning rate times ``g / (|g| + epsilon)``: rounding decides the direction of a weight whose
    gradient is noise, and the length of a step whose gradient is near epsilon, however accurate
    the program. Such weights are left out of the weights' check and counted in ``undetermined``:
    those whose first moment (``state/opt/1/i``) is within ``tolerance`` of 0 (relative to the
    largest of its tensor, or of all first moments when the whole tensor's gradient is that small),
    and those whose step is under 99% of the longest in their tensor. An output's allowed
    difference is ``tolerance``, or ``TF_ERROR_FACTOR`` times TensorFlow's error against the
    export's float64 outputs where that is larger."""
    names = [spec["name"] for spec in exp.manifest["outputs"]]
    refs = {n: np.asarray(r, np.float64) for n, r in zip(names, exp.outputs)}
    before = {spec["name"]: np.asarray(a, np.float64)
              for spec, a in zip(exp.manifest["args"], exp.inputs)}
    first_step = "state/opt/0" in before and not before["state/opt/0"].any()
    scale = {}
    for name, ref in refs.items():
        top = float(np.abs(ref).max()) if ref.size else 0.0
        scale[_group(name)] = max(scale.get(_group(name), 0.0), top)
    wide = dict(zip(names, exp.reference)) if exp.reference is not None else {}
    diffs, allowed, undetermined = {}, {}, 0
    for name, out in zip(names, outputs):
        ref, out = refs[name], np.asarray(out, np.float64)
        keep = np.ones(ref.shape, bool)
        moment = name.replace("state/weights/", "state/opt/1/", 1)
        if first_step and name.startswith("state/weights/") and moment in refs and ref.size:
            m = np.abs(refs[moment])
            step = np.abs(ref - before[name])
            keep = (m > tolerance * m.max()) & (step >= 0.99 * step.max()) \
                & (m.max() > tolerance * scale[_group(moment)])
            undetermined += int(keep.size - keep.sum())
        def error(a, b):
            return float(np.abs(a - b)[keep].max()) / max(scale[_group(name)], 1e-30) \
                if keep.any() else 0.0
        diffs[name] = error(out, ref)
        allowed[name] = max(tolerance, TF_ERROR_FACTOR * error(ref, wide[name])) \
            if name in wide else tolerance
    return diffs, allowed, undetermined


def default_tolerance(platform, variant):
    return TOLERANCE["cpu" if platform == "cpu" else variant]


def replay(path, variant="default", calls=20, warmup=3, tolerance=None):
    """Compile, check and time the export in ``path``; returns the report (a dict, see the
    module's docstring); ``report['ok']`` says whether every output agreed."""
    jax = _jax()
    exp = export.read(path)
    man = exp.manifest
    run, device, info = compile_export(exp, variant)
    args = [jax.device_put(a, device) for a in exp.inputs]
    for arg, spec in zip(args, man["args"]):
        if arg.dtype.name != spec["dtype"]:
            raise ValueError(f"{spec['name']} became {arg.dtype} on {device}, not {spec['dtype']}")
    start = time.perf_counter()
    outputs = [np.asarray(o) for o in run(args)]
    first_run_s = time.perf_counter() - start
    platform = device.platform
    tol = default_tolerance(platform, variant) if tolerance is None else tolerance
    diffs, allowed, undetermined = compare(outputs, exp, tol)
    worst = max(diffs, key=lambda name: diffs[name] / allowed[name])
    n_state, loss_index = man["state_outputs"], man["loss_index"]
    fixed = args[n_state:]                  # the batch: the inputs after the state

    def step(state, _):
        outs = run(list(state) + fixed)
        return outs[:n_state], {"loss": outs[loss_index]}
    timed = timing.time_steps(step, args[:n_state], lambda: None, calls, warmup)
    stats = device.memory_stats() or {}
    config = man["config"]
    record = {
        "export": path, "family": config.get("family"), "preset": config.get("preset"),
        "config": config, "target": man["target"], "variant": variant,
        "jax_version": jax.__version__, "platform": platform,
        "device": getattr(device, "device_kind", str(device)),
        **info, "first_run_s": first_run_s,
        "loss": float(outputs[loss_index]), "tf_loss": man["loss"],
        "tolerance": tol, "max_rel_diff": diffs[worst], "worst_output": worst,
        "allowed": allowed[worst], "ok": bool(diffs[worst] <= allowed[worst]),
        "reference64": exp.reference is not None, "undetermined_weights": undetermined,
        "calls": calls, "warmup": warmup, "step_s": timed["step_s"],
        "peak_memory_bytes": stats.get("peak_bytes_in_use",
                                       resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "peak_memory_kind": "device_peak_bytes_in_use" if "peak_bytes_in_use" in stats
                            else "process_peak_rss",
        "tf_version_at_export": man["tf_version"],
    }
    if config.get("meta_batch"):
        per_s, unit = report.throughput(record)
        record[f"{unit}_per_s"] = per_s
    return record


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    record = replay(FLAGS.from_export, FLAGS.variant, FLAGS.calls, FLAGS.warmup, FLAGS.tolerance)
    s = record["step_s"]
    print(report.format_rows([
        ("replay", f"{record['export']} ({record['family']} {record['preset']}, traced for "
                   f"{record['target']}), variant {record['variant']}"),
        ("device", f"{record['platform']}: {record['device']} (JAX {record['jax_version']})"),
        ("compile", f"{record['compile_s']:.2f} s (StableHLO {record['convert_s']:.2f} s), "
                    f"first run {record['first_run_s']:.3f} s"),
        ("check", f"{'ok' if record['ok'] else 'FAILED'}: worst {record['worst_output']} "
                  f"{record['max_rel_diff']:.2e} of its group's max|TF| (allowed "
                  f"{record['allowed']:.1e}: tolerance {record['tolerance']:.0e} or "
                  f"{TF_ERROR_FACTOR}x TensorFlow's float32 error; "
                  f"{record['undetermined_weights']} weights with a "
                  f"gradient at noise level left out); loss {record['loss']:.6f}, TensorFlow's "
                  f"{record['tf_loss']:.6f}"),
        ("step time", f"median {s['median'] * 1e3:.2f} ms  min {s['min'] * 1e3:.2f}  max "
                      f"{s['max'] * 1e3:.2f}  ({record['calls']} calls after {record['warmup']})"),
        ("peak memory", f"{record['peak_memory_bytes'] / 2 ** 20:.1f} MiB "
                        f"({record['peak_memory_kind']})"),
    ]), flush=True)
    print(json.dumps(record), flush=True)
    return 0 if record["ok"] else 2


def run():
    define_flags()
    flag_groups.run_binary(main, __name__)


if __name__ == "__main__":
    run()
