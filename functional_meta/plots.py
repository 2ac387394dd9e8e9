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


def learning_curves(history_path, path, title=None):
    """Training loss (and accuracy) and validation score with its 95% band against the step."""
    train, val = read_history(history_path)
    if not train:
        raise ValueError(f"{history_path} holds no training records yet")
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = [r["step"] for r in train]
    left.plot(steps, [r["loss"] for r in train], label="train loss")
    if val and "loss" in val[0]:
        left.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation loss")
    left.set_xlabel("step")
    left.set_ylabel("loss")
    left.legend()
    key = "accuracy" if "accuracy" in train[0] or (val and "accuracy" in val[0]) else "mse"
    if key in train[0]:
        right.plot(steps, [r[key] for r in train], label=f"train {key}")
    if val:
        v_steps = np.array([r["step"] for r in val])
        mean = np.array([r[key] for r in val])
        ci = np.array([r.get(key + "_ci95", 0.0) for r in val])
        right.plot(v_steps, mean, "o-", label=f"validation {key}")
        right.fill_between(v_steps, mean - ci, mean + ci, alpha=0.25)
    right.set_xlabel("step")
    right.set_ylabel(key)
    right.legend()
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def sinusoid(curves, path, title="MAML, K=10"):
    """The MAML paper's Figure 2 panel: ground truth, pre-update prediction, predictions after each
    adaptation length, and the K support points (``training.sinusoid_curves`` output)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.8))
    ax.plot(curves["x"], curves["truth"], color="red", label="ground truth")
    ax.plot(curves["x"], curves["pre-update"], ":", color="green", label="pre-update")
    fixed = {"x", "truth", "support_x", "support_y", "pre-update"}
    for name in [k for k in curves if k not in fixed]:
        ax.plot(curves["x"], curves[name], "--", label=name)
    ax.plot(curves["support_x"], curves["support_y"], "^", color="purple",
            label=f"{len(curves['support_x'])} points used for the gradient")
    ax.set_xlim(-5, 5)
    ax.legend(fontsize="small")
    ax.set_title(title)
    return _save(fig, path)


def embeddings(panels, path, title="ProtoNet embeddings of held-out classes (PCA)"):
    """One scatter per ``(label, embeddings [n, D], classes [n])`` panel (e.g. one per checkpoint),
    each projected to 2-D by its own ``pca_2d``, colours by class."""
    if not panels:
        raise ValueError("embeddings needs at least one panel")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    for ax, (label, x, classes) in zip(axes[0], panels):
        xy = pca_2d(x)
        ax.scatter(xy[:, 0], xy[:, 1], c=np.asarray(classes), cmap="tab10", s=12)
        ax.set_title(label)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    return _save(fig, path)
