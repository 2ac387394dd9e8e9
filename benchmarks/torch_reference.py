"""The PyTorch step that the library's speed is compared against, for side-by-side comparisons.

The step a researcher would otherwise use in PyTorch: MAML as a loop over tasks with
``create_graph=True`` (how learn2learn and higher compute the second-order meta-gradient),
ProtoNet with ``torch.cdist``, both with Adam. Step times on a shared machine drift by 10-40%
between runs, so a ratio is only trustworthy when both steps run back to back on the same machine:
this binary is that PyTorch step, for the same presets and flags as fm-maml-bench and
fm-protonet-bench, started from the very same initial weights.

  fm-torch-reference --preset=maml_omniglot_5way                  # config A
  fm-torch-reference --preset=protonet_omniglot --n_way=5 --k_shot=1 --q_query=15
  fm-torch-reference --from_export=/tmp/config_a --torch_device=cuda    # an export's step

With ``--from_export`` (a folder written by fm-maml-bench or fm-protonet-bench --export_hlo) the
configuration, initial weights and episodes are the export's, so this step and the exported one
(fm-xla-replay) do the same work: the first step's loss must equal TensorFlow's (reported as
``tf_loss``). That mode needs neither TensorFlow nor the library's networks.

It computes the same functions as the library ('SAME' padding as TensorFlow pads it, batch norm
with each task's own statistics, the embedding flattened in height-width-channel order), which
tests/test_torch_reference.py checks in float64 against ``maml.meta_gradients`` and ProtoNet's
loss and gradient. Needs PyTorch: ``pip install -e '.[reference]'``. Not used by the library.
"""

import numpy as np
from absl import app, flags

import benchmarks
from benchmarks import flag_groups, report, timing
from functional_meta import export, presets      # free of TensorFlow, as this module

FLAGS = flags.FLAGS
CONV4_PRESETS = sorted(name for name, c in presets.PRESETS.items() if c["net"] == "conv4")


def define_flags():
    """The binary's flags, defined when it runs (not on import: the tests import this module
    beside the other binaries, whose flags share names such as ``--n_way``)."""
    flags.DEFINE_enum("preset", "maml_omniglot_5way", CONV4_PRESETS,
                      "Configuration to run (the conv4 presets of functional_meta.presets).")
    flag_groups.define_episode_flags(None)          # the same four flags for either family
    flags.DEFINE_integer("inner_steps", None, "MAML inner SGD steps; default: the preset's.",
                         lower_bound=1)
    flags.DEFINE_integer("steps", 20, "Timed steps (after --warmup untimed ones).", lower_bound=1)
    flags.DEFINE_integer("warmup", 1, "Untimed steps first; the first one is reported apart.",
                         lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Seed of the initial weights (the library's init) and the "
                         "synthetic episodes.", lower_bound=0)
    flags.DEFINE_integer("threads", 0, "torch.set_num_threads; 0 keeps PyTorch's default (one per "
                         "core).", lower_bound=0)
    flags.DEFINE_bool("json", False, "Also print one JSON line with the configuration and timings.")
    flags.DEFINE_string("from_export", None, "Take the configuration, initial weights and "
                        "episodes from this export (fm-maml-bench/fm-protonet-bench "
                        "--export_hlo) instead of --preset and the episode flags; no TensorFlow "
                        "needed.")
    flags.DEFINE_string("torch_device", "cpu", "PyTorch device of the step: cpu, cuda, cuda:1, ...")
    flags.adopt_module_key_flags(flag_groups)      # --help lists the groups' flags too


def _torch():
    try:
        import torch
    except ImportError as error:
        raise ImportError("fm-torch-reference needs PyTorch: pip install -e '.[reference]'") \
            from error
    return torch


def from_library_weights(weights, device="cpu"):
    """Torch leaf tensors (``requires_grad``) on ``device`` from a library conv4 weight list
    (tensors or numpy arrays): kernels from height-width-in-out to out-in-height-width, the head's
    ``[D, n]`` to ``[n, D]``."""
    torch = _torch()
    out = []
    for w in weights:
        t = torch.from_numpy(np.array(w))
        if t.dim() == 4:
            t = t.permute(3, 2, 0, 1)
        elif t.dim() == 2:
            t = t.t()
        out.append(t.contiguous().to(device).requires_grad_())
    return out


def from_export(path, device="cpu"):
    """``(config, params, batch, tf_loss)`` of an export (``functional_meta.export``): its
    configuration, its initial weights as ``from_library_weights`` gives them, its episodes as
    ``_episodes`` gives them (NCHW images, int64 labels) and TensorFlow's loss of its first step.
    ``ValueError`` when the exported step is not one this binary computes."""
    torch = _torch()
    exp = export.read(path)
    config = exp.manifest["config"]
    algorithm = config.get("algorithm", {})
    problems = [f"{name}={algorithm[name]!r}" for name, want in
                (("order", "second"), ("lr_mode", "fixed"), ("msl", False), ("metric", "euclidean"))
                if name in algorithm and algorithm[name] != want]
    if config.get("net") != "conv4" or config.get("family") not in ("maml", "protonet"):
        problems.append(f"{config.get('family')} with net={config.get('net')!r}")
    if config.get("loss", "cross_entropy") != "cross_entropy":
        problems.append(f"loss={config['loss']!r}")
    if config.get("precision", "float32") != "float32":
        problems.append(f"precision={config['precision']!r}")
    if problems:
        raise ValueError(f"{path}: the reference computes conv4 MAML (second order, fixed inner "
                         f"rate, no multi-step loss) and euclidean ProtoNet in float32, not "
                         f"{', '.join(problems)}")
    params = from_library_weights(export.named(exp, "state/weights/").values(), device)
    parts = list(export.named(exp, "batch/").values())
    batch = tuple(torch.from_numpy(np.moveaxis(a, -1, -3).copy()).to(device) if i % 2 == 0
                  else torch.from_numpy(a).long().to(device) for i, a in enumerate(parts))
    config = dict(config, image_shape=tuple(config["image_shape"]))
    return config, params, batch, exp.manifest["loss"]


def _same_pad(x, stride):
    """TensorFlow's 'SAME' padding of NCHW ``x`` for a 3x3 kernel: ``ceil(size / stride)``
    outputs, an odd total putting the extra row or column at the bottom or right (as
    ``nets._same_padding``, written out here so that the reference needs no TensorFlow)."""
    pads = []
    for size in reversed(x.shape[2:]):                      # F.pad lists the last axis first
        total = max((-(-size // stride) - 1) * stride + 3 - size, 0)
        pads += [total // 2, total - total // 2]
    return _torch().nn.functional.pad(x, pads)


def conv4(params, x, pool):
    """The library's conv4 on NCHW images ``x``: logits with a head, else the embedding."""
    F = _torch().nn.functional
    stride = 2 if pool == "stride" else 1
    for b in range(4):
        kernel, scale, offset = params[3 * b:3 * b + 3]
        if stride == 1:
            x = F.conv2d(x, kernel, padding=1)
        else:
            x = F.conv2d(_same_pad(x, stride), kernel, stride=stride)
        x = F.batch_norm(x, None, None, scale, offset, training=True, eps=1e-3)
        x = F.relu(x)
        if pool == "max":
            x = F.max_pool2d(x, 2)
    x = x.permute(0, 2, 3, 1).flatten(1)                    # height-width-channel, as the library
    return F.linear(x, params[12], params[13]) if len(params) > 12 else x


def maml_meta_gradients(params, tasks, inner_lr, inner_steps, pool="stride"):
    """Mean query loss after ``inner_steps`` SGD steps per task, and its second-order gradient:
    the loop over tasks with ``create_graph=True``. ``tasks`` are NCHW tensors with a task axis."""
    torch = _torch()
    F = torch.nn.functional
    support_x, support_y, query_x, query_y = tasks
    total = 0.0
    for i in range(support_x.shape[0]):
        fast = params
        for _ in range(inner_steps):
            loss = F.cross_entropy(conv4(fast, support_x[i], pool), support_y[i])
            grads = torch.autograd.grad(loss, fast, create_graph=True)
            fast = [w - inner_lr * g for w, g in zip(fast, grads)]
        total = total + F.cross_entropy(conv4(fast, query_x[i], pool), query_y[i])
    meta_loss = total / support_x.shape[0]
    return meta_loss, torch.autograd.grad(meta_loss, params)


def protonet_loss(params, episode, n_way):
    """Mean query cross-entropy of one episode, logits the negative squared distances."""
    torch = _torch()
    support_x, support_y, query_x, query_y = episode
    embedded = conv4(params, torch.cat([support_x, query_x]), "max")
    support, queries = embedded[:support_x.shape[0]], embedded[support_x.shape[0]:]
    one_hot = torch.nn.functional.one_hot(support_y, n_way).to(support.dtype)
    protos = (one_hot.t() @ support) / one_hot.sum(0)[:, None]
    return torch.nn.functional.cross_entropy(-torch.cdist(queries, protos) ** 2, query_y)


def _episodes(config, generator):
    """Random images and shuffled labels of the preset's shape (NCHW), as the library's
    synthetic input: ``(support_x, support_y, query_x, query_y)`` with a task axis."""
    torch = _torch()
    t, n = config["meta_batch"], config["n_way"]
    h, w, c = config["image_shape"]

    def part(shots):
        x = torch.rand([t, n * shots, c, h, w], generator=generator)
        y = torch.stack([torch.randperm(n, generator=generator).repeat(shots) for _ in range(t)])
        return x, y
    return (*part(config["k_shot"]), *part(config["q_query"]))


def build_step(config, params, batch=None):
    """``step() -> loss``: one meta-training step with Adam (lr = the preset's outer rate) on
    ``batch`` (default: ``_episodes`` of seed ``--seed``); the loss is that of the weights before
    the step's update."""
    torch = _torch()
    optimizer = torch.optim.Adam(params, lr=config["outer_lr"])
    if batch is None:
        batch = tuple(part.to(params[0].device) for part in
                      _episodes(config, torch.Generator().manual_seed(FLAGS.seed)))

    def step():
        optimizer.zero_grad()
        if config["family"] == "maml":
            loss, grads = maml_meta_gradients(params, batch, config["inner_lr"],
                                              config["inner_steps"], config["pool"])
            for p, g in zip(params, grads):
                p.grad = g
        else:
            loss = sum(protonet_loss(params, tuple(part[i] for part in batch), config["n_way"])
                       for i in range(config["meta_batch"])) / config["meta_batch"]
            loss.backward()
        optimizer.step()
        return float(loss.detach())
    return step


def _torch_device(torch):
    """The ``--torch_device``, checked (a ``UsageError`` naming the flag)."""
    try:
        device = torch.device(FLAGS.torch_device)
    except RuntimeError as error:
        raise app.UsageError(f"--torch_device={FLAGS.torch_device}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise app.UsageError(f"--torch_device={FLAGS.torch_device} but PyTorch sees no GPU")
    return device


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    overrides = {name: FLAGS[name].value for name in
                 ("n_way", "k_shot", "q_query", "meta_batch", "inner_steps")}
    torch = _torch()
    device = _torch_device(torch)
    if FLAGS.from_export:
        given = [f"--{name}" for name in ("preset", *overrides, "seed") if FLAGS[name].present]
        if given:
            raise app.UsageError(f"--from_export takes the configuration, weights and episodes "
                                 f"from the export: drop {', '.join(given)}")
        try:
            config, params, batch, tf_loss = from_export(FLAGS.from_export, device)
        except ValueError as error:
            raise app.UsageError(f"--from_export: {error}") from None
        preset = config.get("preset")
    else:
        if presets.PRESETS[FLAGS.preset]["family"] == "protonet" and overrides["inner_steps"]:
            raise app.UsageError(f"--inner_steps is a MAML setting; --preset={FLAGS.preset} is "
                                 "ProtoNet")
        benchmarks.start_tensorflow()                # the library's initial weights
        config = presets.get(FLAGS.preset, **{k: v for k, v in overrides.items() if k in
                                              presets.PRESETS[FLAGS.preset]})
        init, _ = presets.network(config)
        params, batch, tf_loss, preset = from_library_weights(init(FLAGS.seed), device), None, \
            None, FLAGS.preset
    if FLAGS.threads:
        torch.set_num_threads(FLAGS.threads)
    step = build_step(config, params, batch)
    losses = []

    def timed_step(state, _):
        losses.append(step())
        return state, {"loss": losses[-1]}
    # The benchmarks' own timing (first call apart, median of the timed steps), so both sides of
    # a side-by-side pair are measured alike.
    timed = timing.time_steps(timed_step, None, lambda: None, FLAGS.steps, FLAGS.warmup)
    extra, rows = {"torch_device": str(device)}, []
    if device.type == "cuda":
        where = f"on {torch.cuda.get_device_name(device)}"
        extra.update(peak_memory_bytes=torch.cuda.max_memory_allocated(device),
                     matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
                     cudnn_tf32=torch.backends.cudnn.allow_tf32)
    else:
        where = f"{torch.get_num_threads()} threads"
    if tf_loss is not None:
        extra.update(export=FLAGS.from_export, first_loss=losses[0], tf_loss=tf_loss)
        rows.append(("first loss", f"{losses[0]:.6f} (TensorFlow's on the export: {tf_loss:.6f})"))
    report.report_reference(
        "torch_reference",
        f"PyTorch {torch.__version__} reference, {preset} ({config['n_way']}-way "
        f"{config['k_shot']}-shot {config['q_query']}-query, meta-batch {config['meta_batch']}), "
        f"{where}", config, timed, more_rows=rows, preset=preset,
        torch_version=torch.__version__, threads=torch.get_num_threads(), **extra)


def run():
    define_flags()
    flag_groups.run_binary(main, __name__)


if __name__ == "__main__":
    run()
