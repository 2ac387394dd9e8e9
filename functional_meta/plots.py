"""Figures of a training run as PNG files: learning curves, the MAML sinusoid figure, and ProtoNet
embeddings projected to 2-D.

matplotlib is an optional extra (``pip install 'functional_meta[plot]'``); it is imported only when
a figure is drawn, so the rest of the package never needs it. The data for the figures comes from
``functional_meta.training`` (``history.jsonl``, ``sinusoid_curves``, ``embed_classes``).
"""

import json
from pathlib import Path

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'functional_meta[plot]' "
                          "(or pip install matplotlib)") from None
    matplotlib.use("Agg")            # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def pca_2d(x):
    """Projection of the rows of ``x [n, D]`` onto their first two principal axes (numpy SVD of
    the centred data), ``[n, 2]``; fewer than two features are padded with zeros."""
    x = np.asarray(x, np.float64)
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ vt[:2].T
    return np.pad(projected, [(0, 0), (0, 2 - projected.shape[1])])


def read_history(path):
    """The records of a run's ``history.jsonl``: ``(train_records, val_records)``."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return ([r for r in records if r.get("split") != "val"],
            [r for r in records if r.get("split") == "val"])


def _run_config(history_path):
    """The ``config.json`` beside a history file (as ``training.train`` writes it), or ``{}``."""
    path = Path(history_path).parent / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _episodes(config, validation):
    """How a run's episodes were drawn, for a legend: ``'20-way 1-shot'``, ``'K=10, 5 inner
    steps'``, ``'5 classes x 10 instances'`` (a MANN's sequences); ``''`` when ``config`` does
    not say."""
    if "n_way" not in config:
        return ""
    if config.get("family") == "mann":          # sequences of n_way classes, k_shot times each
        return f"{config['n_way']} classes x {config['k_shot']} instances"
    if config.get("loss") == "mse":
        steps = config.get("test_inner_steps" if validation else "inner_steps")
        text = f"K={config['k_shot']}"
        return text + (f", {steps} inner step{'s' * (steps != 1)}" if steps else "")
    way = (config.get("test_n_way") or config["n_way"]) if validation else config["n_way"]
    return f"{way}-way {config['k_shot']}-shot"


def _label(name, detail):
    return f"{name} ({detail})" if detail else name


def learning_curves_figure(history_path, title=None, config=None):
    """The figure of ``learning_curves`` (a matplotlib ``Figure``; close it when done)."""
    train, val = read_history(history_path)
    if not train:
        raise ValueError(f"{history_path} holds no training records yet")
    config = _run_config(history_path) if config is None else config
    train_label = _label("training", _episodes(config, validation=False))
    val_label = _label("validation", _episodes(config, validation=True))
    if len(train) > 1:
        every = train[1]["step"] - train[0]["step"]
        train_label += f", mean of each {every} steps" if every > 1 else ""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in train]
    key = "accuracy" if "accuracy" in train[0] or (val and "accuracy" in val[0]) else "mse"

    def validation_curve(ax, name):
        v_steps = np.array([r["step"] for r in val])
        mean = np.array([r[name] for r in val])
        ci = np.array([r.get(name + "_ci95", 0.0) for r in val])
        ax.plot(v_steps, mean, "o-", color="C1", label=val_label)
        if any(ci > 0):
            ax.fill_between(v_steps, mean - ci, mean + ci, color="C1", alpha=0.25,
                            label="validation 95% interval")

    left.plot(steps, [r["loss"] for r in train], color="C0", label=train_label)
    if val and "loss" in val[0]:
        validation_curve(left, "loss")
    left.set_xlabel("step")
    left.set_ylabel("loss (query sets)" if key == "accuracy" else "loss: query MSE")
    if key in train[0]:
        right.plot(steps, [r[key] for r in train], color="C0", label=train_label)
    elif key == "mse":              # a regression loss is the query MSE after adaptation
        right.plot(steps, [r["loss"] for r in train], color="C0", label=train_label)
    if val:
        validation_curve(right, key)
    right.set_xlabel("step")
    right.set_ylabel("query accuracy" if key == "accuracy" else "query MSE")
    for ax in (left, right):        # below the axes, so they cover none of the curves
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.2))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def learning_curves(history_path, path, title=None, config=None):
    """Training loss and accuracy (or MSE), and the validation values with their 95% band,
    against the step, written to the PNG ``path``. The legends say how each was measured (from
    ``config``, by default the run's ``config.json`` beside ``history_path``): the training way
    and shot (the mean over each progress window) and the validation way and shot."""
    return _save(learning_curves_figure(history_path, title, config), path)


def sinusoid_figure(curves, title="MAML, K=10"):
    """The figure of ``sinusoid`` (a matplotlib ``Figure``; close it when done)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    ax.plot(curves["x"], curves["truth"], color="red", label="ground truth")
    ax.plot(curves["x"], curves["pre-update"], ":", color="green", label="pre-update")
    fixed = {"x", "truth", "support_x", "support_y", "pre-update"}
    for name in [k for k in curves if k not in fixed]:
        ax.plot(curves["x"], curves[name], "--", label=f"after {name}")
    ax.plot(curves["support_x"], curves["support_y"], "^", color="purple",
            label=f"{len(curves['support_x'])} points used for the gradient")
    ax.set_xlim(-5, 5)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    # Beside the axes, so it covers none of the curves or points.
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def sinusoid(curves, path, title="MAML, K=10"):
    """The MAML paper's Figure 2 panel: ground truth, pre-update prediction, predictions after each
    adaptation length, and the K support points (``training.sinusoid_curves`` output), with the
    legend beside the axes; written to the PNG ``path``."""
    return _save(sinusoid_figure(curves, title), path)


def embeddings_figure(panels, title="ProtoNet embeddings of held-out classes (PCA)"):
    """The figure of ``embeddings`` (a matplotlib ``Figure``; close it when done)."""
    if not panels:
        raise ValueError("embeddings needs at least one panel")
    plt = _pyplot()
    names = list(dict.fromkeys(c for _, _, classes in panels for c in np.asarray(classes)))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    for ax, (label, x, classes) in zip(axes[0], panels):
        xy = pca_2d(x)
        classes = np.asarray(classes)
        for i, name in enumerate(names):
            chosen = classes == name
            if chosen.any():
                ax.scatter(xy[chosen, 0], xy[chosen, 1], s=12, color=f"C{i % 10}",
                           label=str(name))
        ax.set_title(label)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = {}
    for ax in axes[0]:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, handle)
    fig.legend(list(handles.values()), list(handles), title="class", loc="lower center",
               ncol=min(len(names), 5), fontsize="small", bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08 + 0.05 * ((len(names) - 1) // 5), 1, 1))
    return fig


def embeddings(panels, path, title="ProtoNet embeddings of held-out classes (PCA)"):
    """One scatter per ``(label, embeddings [n, D], classes [n])`` panel (e.g. one per checkpoint),
    each projected to 2-D by its own ``pca_2d``, one colour per class (the same in every panel)
    and a class legend; ``classes`` are names or numbers. Written to the PNG ``path``."""
    return _save(embeddings_figure(panels, title), path)


def accuracy_by_instance(curves, path, title="Accuracy by instance (held-out classes)",
                         references=None):
    """Santoro et al. (2016) Figure 2's shape: accuracy against the instance number of a class in
    its episode, one line with its 95% band per model; ``curves`` maps a label to ``(means [K],
    half-widths [K])`` for instances ``1..K``. ``references`` maps a label to ``{instance:
    accuracy}`` (published figures), drawn as black markers."""
    if not curves:
        raise ValueError("accuracy_by_instance needs at least one curve")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.8))
    for label, (mean, ci) in curves.items():
        mean, ci = np.asarray(mean, np.float64), np.asarray(ci, np.float64)
        instances = np.arange(1, len(mean) + 1)
        ax.plot(instances, mean, "o-", label=label)
        ax.fill_between(instances, mean - ci, mean + ci, alpha=0.25)
    for marker, (label, row) in zip("*xd+^", (references or {}).items()):
        ax.plot(list(row), list(row.values()), marker, color="k", markersize=8, label=label)
    ax.set_xlabel("instance")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    if len(curves) + len(references or {}) <= 4:          # the curves rise from the left
        ax.legend(fontsize="small", loc="lower right")
    else:                                                 # beside the axes, not over the lines
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    ax.set_title(title)
    return _save(fig, path)


def navigation_trajectories(observations, goal, path, title="MAML, 2D navigation"):
    """The MAML paper's Figure 4 panel: a held-out goal and, before adaptation and after each
    policy-gradient step, the mean position over the K sampled trajectories at each time step
    (thick) and one of the trajectories (faint); ``observations [stages, K, H, 2]`` is the second
    output of ``maml_rl.make_evaluator`` for one task. Written to the PNG ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(observations)))
    for stage, (paths, color) in enumerate(zip(observations, colors)):
        label = "pre-update" if stage == 0 else f"{stage} step{'s' if stage > 1 else ''}"
        paths = np.concatenate([np.zeros_like(paths[:, :1]), np.asarray(paths)], axis=1)
        ax.plot(paths[0, :, 0], paths[0, :, 1], "-", color=color, alpha=0.25, lw=0.8)
        mean = paths.mean(axis=0)                    # the mean position at each time step
        ax.plot(mean[:, 0], mean[:, 1], "-", color=color, lw=2.2, label=label)
    ax.plot(goal[0], goal[1], "*", color="red", markersize=14, label="goal")
    ax.plot(0, 0, "o", color="black", markersize=5)
    ax.set_xlim(-0.6, 0.6)
    ax.set_ylim(-0.6, 0.6)
    ax.set_aspect("equal")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    return _save(fig, path)


def returns_by_step(rows, max_steps, path, title="Return after adaptation"):
    """Mean return against the number of policy-gradient steps, one line per row of
    ``rows`` (``{'name', 'return_<s>', 'return_<s>_ci95'}``) with its 95% band; PNG ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    steps = np.arange(max_steps + 1)
    for row in rows:
        mean = np.array([row[f"return_{s}"] for s in steps])
        half = np.array([row[f"return_{s}_ci95"] for s in steps])
        ax.plot(steps, mean, "o-", label=row["name"])
        ax.fill_between(steps, mean - half, mean + half, alpha=0.2)
    ax.set_xticks(steps)
    ax.set_xlabel("policy-gradient steps on the held-out task")
    ax.set_ylabel("mean return (95% interval)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def rl_learning_curve(history_path, path, title="MAML-RL"):
    """A MAML-RL run's mean return after adaptation in each progress window (minus its
    ``loss``) and, if it validated, the held-out return with its 95% band, against the step;
    PNG ``path``."""
    plt = _pyplot()
    train, val = read_history(history_path)
    val = [r for r in val if "return" in r]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot([r["step"] for r in train], [-r["loss"] for r in train], "-",
            label="training: mean return after adaptation, each progress window")
    if val:
        steps = np.array([r["step"] for r in val])
        mean = np.array([r["return"] for r in val])
        half = np.array([r["return_ci95"] for r in val])
        ax.plot(steps, mean, "o-", label="held-out tasks after the test-time steps (95% band)")
        ax.fill_between(steps, mean - half, mean + half, alpha=0.2)
    ax.set_xlabel("meta-step")
    ax.set_ylabel("mean return")
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.18))
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)
