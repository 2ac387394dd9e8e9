"""The GPU check in two commands: export the compiled steps here (TensorFlow), replay them under
XLA and run the PyTorch reference on the same episodes there (a GPU machine with JAX and PyTorch,
no TensorFlow).

  python -m benchmarks.gpu_check prepare --dir=gpu_check            # here: writes four exports
  python -m benchmarks.gpu_check run --dir=gpu_check                # there: JSON out

``prepare`` exports, traced for ``--target`` (default gpu), the steps of ``CHECKS``: config A
(``maml_omniglot_5way``), the 20-way preset, ProtoNet 5-way 1-shot 15-query and 60-way 5-shot
5-query, each with ``fm-maml-bench``/``fm-protonet-bench --export_hlo`` in its own process, and
copies the installed absl-py (pure Python; the binaries' flags) beside them for a machine that
lacks it. ``run`` needs the project's source tree, that folder, JAX and PyTorch: for each export,
``fm-xla-replay`` of each ``--variants`` and ``fm-torch-reference --from_export`` (CUDA when
PyTorch sees a GPU), one process each under a per-process timeout and a total budget
(``--budget_s``, default 280 s, the check being meant to finish under 5 minutes). It writes
``--json_out`` (default ``DIR/gpu_check.json``): every process's JSON record, or why it has none,
and per export the ratio of PyTorch's median step time to XLA's. Exit status 1 when a replay
disagreed with TensorFlow's outputs or a process failed. A CPU replays a step traced for a GPU
slowly (its per-task convolutions are grouped convolutions); ``--target=cpu`` exports CPU graphs.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

VENDORED = "python"        # the folder of the exports holding absl-py for the run side


def _dir_argument(argv):
    """``--dir``'s value in ``argv`` (before the flags are parsed), else its default."""
    for i, arg in enumerate(argv):
        if arg.startswith("--dir="):
            return arg.split("=", 1)[1]
        if arg == "--dir" and i + 1 < len(argv):
            return argv[i + 1]
    return "gpu_check"


if importlib.util.find_spec("absl") is None:   # a GPU machine without absl-py: prepare's copy
    sys.path.append(os.path.abspath(os.path.join(_dir_argument(sys.argv), VENDORED)))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
# name -> (binary module, its flags): the exported steps.
CHECKS = {
    "maml_5way": ("benchmarks.maml_bench", ["--preset=maml_omniglot_5way"]),
    "maml_20way": ("benchmarks.maml_bench", ["--preset=maml_omniglot_20way"]),
    "protonet_5way": ("benchmarks.protonet_bench",
                      ["--preset=protonet_omniglot", "--n_way=5", "--k_shot=1", "--q_query=15"]),
    "protonet_60way": ("benchmarks.protonet_bench", ["--preset=protonet_omniglot"]),
}


def define_flags():
    flags.DEFINE_string("dir", "gpu_check", "Folder of the exports (prepare writes it, run reads "
                        "it).")
    flags.DEFINE_list("checks", list(CHECKS), f"Which steps (of {', '.join(CHECKS)}).")
    flags.DEFINE_enum("target", "gpu", ["cpu", "gpu"], "prepare: the device kind the steps are "
                      "traced for.")
    flags.DEFINE_multi_string("bench_flag", [], "prepare: a flag passed to every export, e.g. "
                              "--bench_flag=--meta_batch=2 (small shapes for a test).")
    flags.DEFINE_list("variants", ["default", "fp32"], "run: HLO variants replayed, in this order "
                      "(default: TensorFlow's dots, TF32 allowed on a GPU; fp32: every dot at "
                      "precision HIGHEST).")
    flags.DEFINE_integer("calls", 50, "run: timed calls of each replay and steps of each PyTorch "
                         "run.", lower_bound=1)
    flags.DEFINE_integer("warmup", 3, "run: untimed calls after the first.", lower_bound=1)
    flags.DEFINE_integer("timeout_s", 120, "run: limit of each process, seconds.", lower_bound=1)
    flags.DEFINE_integer("budget_s", 280, "run: total seconds; processes that would start after "
                         "it are skipped (and say so).", lower_bound=1)
    flags.DEFINE_string("torch_device", None, "run: PyTorch's device (default: cuda when PyTorch "
                        "sees a GPU, else cpu).")
    flags.DEFINE_string("json_out", None, "run: where to write the JSON (default DIR/"
                        "gpu_check.json).")

    def check_names(names):
        unknown = sorted(set(names) - set(CHECKS))
        if unknown:
            raise flags.ValidationError(f"--checks: unknown {unknown}; choose from {list(CHECKS)}")
        return True
    flags.register_validator("checks", check_names)
    flags.register_validator("variants", lambda v: set(v) <= {"default", "fp32"},
                             "--variants: choose from default, fp32")


def prepare():
    """Export every ``--checks`` step into ``--dir``, one process each (absl flags are global);
    copy absl-py beside them."""
    import absl
    os.makedirs(FLAGS.dir, exist_ok=True)
    for name in FLAGS.checks:
        module, args = CHECKS[name]
        out = os.path.join(FLAGS.dir, name)
        command = [sys.executable, "-m", module, *args, *FLAGS.bench_flag, "--device=cpu",
                   f"--export_hlo={out}", f"--export_target={FLAGS.target}"]
        print(f"{name}: {' '.join(command[2:])}", flush=True)
        subprocess.run(command, check=True)
    vendored = os.path.join(FLAGS.dir, VENDORED, "absl")
    shutil.rmtree(vendored, ignore_errors=True)
    shutil.copytree(os.path.dirname(absl.__file__), vendored,
                    ignore=shutil.ignore_patterns("__pycache__", "testing"))
    print(f"wrote {FLAGS.dir}: copy it and the project's source tree to the GPU machine, then "
          f"python -m benchmarks.gpu_check run --dir={FLAGS.dir}")


def _last_json(text):
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def _process(command, deadline, env):
    """Run ``command`` within ``--timeout_s`` and ``deadline``: ``{'record': its last JSON line,
    'seconds', 'returncode'}``, or ``{'error': why}``."""
    left = deadline - time.monotonic()
    if left < 5:
        return {"error": "skipped: --budget_s spent", "command": command[2:]}
    limit = min(FLAGS.timeout_s, left)
    start = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {limit:.0f} s", "command": command[2:]}
    result = {"seconds": round(time.monotonic() - start, 2), "returncode": done.returncode,
              "record": _last_json(done.stdout)}
    if result["record"] is None:
        result.update(error="no JSON record", stderr_tail=done.stderr[-2000:],
                      command=command[2:])
    return result


def _torch_device():
    if FLAGS.torch_device:
        return FLAGS.torch_device
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _versions():
    found = {"python": sys.version.split()[0]}
    for module in ("jax", "jaxlib", "torch", "numpy"):
        try:
            found[module] = __import__(module).__version__
        except ImportError:
            found[module] = None
    try:
        found["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        found["nvidia_smi"] = None
    return found


def run_checks():
    """Replay and PyTorch runs of every export in ``--dir``; returns ``(report, ok)``."""
    start = time.monotonic()
    deadline = start + FLAGS.budget_s
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [root, os.path.abspath(os.path.join(FLAGS.dir, VENDORED))]
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    torch_device = _torch_device()
    names = [n for n in FLAGS.checks if os.path.isdir(os.path.join(FLAGS.dir, n))]
    results = {n: {"export": os.path.join(FLAGS.dir, n), "replay": {}} for n in names}
    missing = sorted(set(FLAGS.checks) - set(names))
    calls = [f"--calls={FLAGS.calls}", f"--warmup={FLAGS.warmup}"]
    # The first variant and PyTorch for every export first: the figures that matter most come
    # before the budget can run out.
    order = [(n, v) for v in FLAGS.variants[:1] for n in names] + \
            [(n, "torch") for n in names] + [(n, v) for v in FLAGS.variants[1:] for n in names]
    for name, what in order:
        folder = results[name]["export"]
        if what == "torch":
            command = [sys.executable, "-m", "benchmarks.torch_reference",
                       f"--from_export={folder}", f"--torch_device={torch_device}",
                       f"--steps={FLAGS.calls}", f"--warmup={FLAGS.warmup}", "--json"]
            results[name]["torch"] = _process(command, deadline, env)
        else:
            command = [sys.executable, "-m", "benchmarks.xla_replay", f"--from_export={folder}",
                       f"--variant={what}", *calls]
            results[name]["replay"][what] = _process(command, deadline, env)
        print(f"{name} {what}: {_summary(results[name], what)}", flush=True)
    ok = not missing
    for result in results.values():
        runs = list(result["replay"].values()) + [result.get("torch", {})]
        ok = ok and all("error" not in r and r["returncode"] == 0 for r in runs)
        xla = result["replay"].get(FLAGS.variants[0], {}).get("record")
        torch_record = result.get("torch", {}).get("record")
        if xla and torch_record:
            result["torch_over_xla"] = torch_record["step_s"]["median"] / xla["step_s"]["median"]
    report = {"check": "gpu_check", "dir": FLAGS.dir, "versions": _versions(),
              "torch_device": torch_device, "variants": FLAGS.variants, "calls": FLAGS.calls,
              "missing_exports": missing, "results": results, "ok": ok,
              "seconds": round(time.monotonic() - start, 2)}
    return report, ok


def _summary(result, what):
    run = result["torch"] if what == "torch" else result["replay"][what]
    if "error" in run:
        return run["error"]
    r = run["record"]
    per_s = r.get("tasks_per_s") or r.get("episodes_per_s")
    text = f"median {r['step_s']['median'] * 1e3:.2f} ms, {per_s:.1f}/s"
    if what != "torch":
        text += f", compile {r['compile_s']:.1f} s, check {'ok' if r['ok'] else 'FAILED'} " \
                f"({r['max_rel_diff']:.1e})"
    return text


def main(argv):
    if len(argv) != 2 or argv[1] not in ("prepare", "run"):
        raise app.UsageError("usage: python -m benchmarks.gpu_check prepare|run [--flags]")
    if argv[1] == "prepare":
        prepare()
        return 0
    report, ok = run_checks()
    out = FLAGS.json_out or os.path.join(FLAGS.dir, "gpu_check.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {out} ({report['seconds']:.0f} s, {'ok' if ok else 'NOT ok'})")
    print(json.dumps({k: report[k] for k in ("ok", "seconds", "versions", "torch_device")} |
                     {"torch_over_xla": {n: r.get("torch_over_xla")
                                         for n, r in report["results"].items()}}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    define_flags()
    app.run(main)
