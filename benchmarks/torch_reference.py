"""The PyTorch step that the library's speed is compared against, for side-by-side comparisons.

The step a researcher would otherwise use in PyTorch: MAML as a loop over tasks with
``create_graph=True`` (how learn2learn and higher compute the second-order meta-gradient),
ProtoNet with ``torch.cdist``, both with Adam. Step times on a shared machine drift by 10-40%
between runs, so a ratio is only trustworthy when both steps run back to back on the same machine:
this binary is that PyTorch step, for the same presets and flags as fm-maml-bench and
fm-protonet-bench, started from the very same initial weights.

  fm-torch-reference --preset=maml_omniglot_5way                  # config A
  fm-torch-reference --preset=protonet_omniglot --n_way=5 --k_shot=1 --q_query=15

It computes the same functions as the library ('SAME' padding as TensorFlow pads it, batch norm
with each task's own statistics, the embedding flattened in height-width-channel order), which
tests/test_torch_reference.py checks in float64 against ``maml.meta_gradients`` and ProtoNet's
loss and gradient. Needs PyTorch: ``pip install -e '.[reference]'``. Not used by the library.
"""

from absl import app, flags

import benchmarks
from benchmarks import flag_groups, report
from functional_meta import presets              # free of TensorFlow, as this module

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
    flags.adopt_module_key_flags(flag_groups)      # --help lists the groups' flags too


def _torch():
    try:
        import torch
    except ImportError as error:
        raise ImportError("fm-torch-reference needs PyTorch: pip install -e '.[reference]'") \
            from error
    return torch


def from_library_weights(weights):
    """Torch leaf tensors (``requires_grad``) from a library conv4 weight list: kernels from
    height-width-in-out to out-in-height-width, the head's ``[D, n]`` to ``[n, D]``."""
    torch = _torch()
    out = []
    for w in weights:
        t = torch.from_numpy(w.numpy().copy())
        if t.dim() == 4:
            t = t.permute(3, 2, 0, 1).contiguous()
        elif t.dim() == 2:
            t = t.t().contiguous()
        out.append(t.requires_grad_())
    return out


def _same_pad(x, stride):
    """TensorFlow's 'SAME' padding of NCHW ``x`` (``nets._same_padding``: an odd total puts the
    extra row or column at the bottom or right)."""
    from functional_meta import nets
    (_, rows), (_, cols) = (nets._same_padding(size, stride) for size in x.shape[2:])
    return _torch().nn.functional.pad(x, cols + rows)       # F.pad lists the last axis first


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


def build_step(config, params):
    """``step() -> loss``: one meta-training step with Adam (lr = the preset's outer rate)."""
    torch = _torch()
    optimizer = torch.optim.Adam(params, lr=config["outer_lr"])
    batch = _episodes(config, torch.Generator().manual_seed(FLAGS.seed))

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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    overrides = {name: FLAGS[name].value for name in
                 ("n_way", "k_shot", "q_query", "meta_batch", "inner_steps")}
    if presets.PRESETS[FLAGS.preset]["family"] == "protonet" and overrides["inner_steps"]:
        raise app.UsageError(f"--inner_steps is a MAML setting; --preset={FLAGS.preset} is ProtoNet")
    torch = _torch()
    benchmarks.start_tensorflow()                # the library's initial weights
    from benchmarks import runner
    config = presets.get(FLAGS.preset, **{k: v for k, v in overrides.items() if k in
                                          presets.PRESETS[FLAGS.preset]})
    if FLAGS.threads:
        torch.set_num_threads(FLAGS.threads)
    init, _ = presets.network(config)
    step = build_step(config, from_library_weights(init(FLAGS.seed)))
    # The benchmarks' own timing (first call apart, median of the timed steps), so both sides of
    # a side-by-side pair are measured alike.
    timing = runner.time_steps(lambda state, batch: (state, {"loss": step()}), None,
                               lambda: None, FLAGS.steps, FLAGS.warmup)
    report.report_reference(
        "torch_reference",
        f"PyTorch {torch.__version__} reference, {FLAGS.preset} ({config['n_way']}-way "
        f"{config['k_shot']}-shot {config['q_query']}-query, meta-batch {config['meta_batch']}), "
        f"{torch.get_num_threads()} threads", config, timing,
        torch_version=torch.__version__, threads=torch.get_num_threads())


def run():
    define_flags()
    flag_groups.run_binary(main, __name__)


if __name__ == "__main__":
    run()
