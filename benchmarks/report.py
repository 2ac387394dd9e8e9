"""The benchmarks' report: a run's record as the table the binaries print (and the JSON line
with ``--json``)."""

import csv
import json
import os

from benchmarks.flag_groups import FLAGS
from functional_meta import presets

STALL_FRACTION = 0.1  # a step "stalls" when waiting for its input takes over this share of it


def _si(value, unit):
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def throughput(r):
    """``(per_second, unit)`` of a record with ``config`` and ``step_s``: the meta-batch over the
    median step, in tasks (MAML) or episodes (ProtoNet, MANN/LSTM sequences)."""
    unit = "episodes" if r["config"]["family"] in ("protonet", "mann") else "tasks"
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
           else f"resnet12 {'-'.join(map(str, presets.resnet12_widths(c['channels'])))}"
           if c["net"] == "resnet12" else f"mlp {'-'.join(map(str, c['hidden']))}")
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


def append_csv(path, rows):
    """Append ``rows`` (dicts with the same keys) to the CSV file ``path``, with a header row when
    the file is new."""
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
