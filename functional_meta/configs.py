"""Training configs: a preset plus the algorithm and overrides, checked before anything is compiled.

A config is a plain JSON-able dict. ``train`` stores it as ``config.json`` in the run folder, so
evaluation can rebuild the network and a resume can refuse a changed config
(``check_same_config``).

This module and ``presets`` do not import TensorFlow, so that the binaries can define and check
their flags before they import it.
"""

import json
import math
import os
from pathlib import Path

import numpy as np

from functional_meta import choices, presets

ALGORITHMS = ("maml", "fomaml", "metasgd", "protonet", "pretrain")
LR_MODES = ("fixed", "metasgd", "lslr")
DATA_SOURCES = choices.IMAGE_SOURCES + ("sinusoid",)
CONFIG_FILE = "config.json"
# Fields that may change when a run is resumed (everything else must match the stored config).
RUN_FIELDS = ("steps",)
# Config fields added after runs were first stored, with the value that earlier runs had: a
# config.json without them reads as if it held these (``read_config``).
LATER_DEFAULTS = {"lr_decay_every": 0, "lr_decay": 0.5, "augment_shift": 0, "augment_rotate": 0.0,
                  "augment_scale": 0.0}
AUGMENT_FIELDS = ("augment_shift", "augment_rotate", "augment_scale")


def default_preset(algorithm, data=None):
    """The preset a binary starts from when ``--preset`` is not given."""
    if algorithm == "protonet":
        return "protonet_omniglot"
    if algorithm == "pretrain" or data == "sinusoid":
        return "maml_sinusoid"
    if data in ("mnist", "mnist_tfds"):
        return "maml_mnist_mlp"
    return "maml_omniglot_5way"


def check_positive_int(config, *names):
    """Raises ``ValueError`` naming the first of ``names`` whose value in ``config`` is not a
    positive integer."""
    for name in names:
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_positive_float(config, *names):
    for name in names:
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def make_config(algorithm, preset=None, data=None, lr_mode=None, metric="euclidean",
                lr_decay_every=0, lr_decay=0.5, augment_shift=0, augment_rotate=0.0,
                augment_scale=0.0, **overrides):
    """A checked, JSON-able training config: preset fields, ``algorithm``, ``lr_mode``,
    ``first_order``, ``metric``, ``data``, the outer-rate schedule and the training augmentation.
    ``None`` overrides keep the preset's value.

    ``lr_decay_every`` (0: constant rate) and ``lr_decay``: the meta-optimiser's rate ``outer_lr``
    is multiplied by ``lr_decay`` every ``lr_decay_every`` steps (``optim.step_decay``; ProtoNet's
    paper halves it every 2000 episodes). ``augment_shift``, ``augment_rotate``, ``augment_scale``:
    training episodes' images move by up to this many pixels, rotate by up to this many degrees,
    scale by up to this fraction (``episodes.EpisodeSampler``); validation and test episodes never
    do.

    ``algorithm``: ``maml`` (second order), ``fomaml``, ``metasgd`` (learned per-weight inner rates),
    ``protonet``, or ``pretrain`` (the sinusoid baseline: one network regressed on the mixture of
    tasks, fine-tuned at test time like MAML). ``lr_mode='lslr'`` with ``maml`` gives MAML++'s
    per-layer per-step learned rates.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {list(ALGORITHMS)}, got {algorithm!r}")
    preset = preset or default_preset(algorithm, data)
    if preset not in presets.PRESETS:
        raise ValueError(f"preset must be one of {sorted(presets.PRESETS)}, got {preset!r}")
    config = presets.get(preset, **{k: v for k, v in overrides.items() if k in presets.PRESETS[preset]
                                    or k in ("hidden", "channels", "pool", "test_n_way")})
    unknown = sorted(k for k, v in overrides.items() if k not in config and v is not None)
    if unknown:
        raise ValueError(f"preset {preset!r} has no field(s) {unknown}")
    family = "protonet" if algorithm == "protonet" else "maml"
    if config["family"] != family:
        raise ValueError(f"preset={preset!r} is a {config['family']} preset but algorithm="
                         f"{algorithm!r} needs a {family} preset")
    if algorithm == "metasgd":
        if lr_mode not in (None, "metasgd"):
            raise ValueError(f"algorithm='metasgd' learns per-weight rates; lr_mode={lr_mode!r} "
                             "contradicts it (leave lr_mode unset)")
        lr_mode = "metasgd"
    lr_mode = lr_mode or "fixed"
    if lr_mode not in LR_MODES:
        raise ValueError(f"lr_mode must be one of {list(LR_MODES)}, got {lr_mode!r}")
    if family == "protonet" and lr_mode != "fixed":
        raise ValueError("lr_mode applies to MAML's inner loop; protonet has none")
    if algorithm == "pretrain" and lr_mode != "fixed":
        raise ValueError("algorithm='pretrain' fine-tunes with a fixed inner_lr; leave lr_mode unset")
    if metric not in choices.METRICS:
        raise ValueError(f"metric must be one of {list(choices.METRICS)}, got {metric!r}")
    config.update(preset=preset, algorithm=algorithm, lr_mode=lr_mode, metric=metric,
                  first_order=algorithm == "fomaml", lr_decay_every=lr_decay_every,
                  lr_decay=lr_decay, augment_shift=augment_shift, augment_rotate=augment_rotate,
                  augment_scale=augment_scale)
    if data is not None:
        config["data"] = data
    check_config(config)
    return json.loads(json.dumps(config))        # tuples -> lists: the same dict config.json holds


def check_config(config):
    """Raises ``ValueError`` naming the field (the binaries' flag of the same name) if a config
    cannot be trained; run before anything is loaded or compiled."""
    if config.get("data") not in DATA_SOURCES:
        raise ValueError(f"data must be one of {list(DATA_SOURCES)}, got {config.get('data')!r}")
    regression = config.get("loss") == "mse"
    if config["algorithm"] == "pretrain" and config["data"] != "sinusoid":
        raise ValueError("algorithm='pretrain' is the sinusoid baseline; use data='sinusoid'")
    if (config["data"] == "sinusoid") != regression:
        raise ValueError(f"data={config['data']!r} does not fit preset={config.get('preset')!r} "
                         f"(loss {config.get('loss')!r}): sinusoid data needs a regression preset "
                         "(maml_sinusoid) and a regression preset needs data='sinusoid'")
    if config["algorithm"] == "protonet" and regression:
        raise ValueError("algorithm='protonet' classifies; it cannot train on sinusoid regression")
    check_positive_int(config, "n_way", "k_shot", "q_query", "meta_batch")
    _check_positive_float(config, "outer_lr")
    for name in ("lr_decay_every", "augment_shift"):
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    decay = config["lr_decay"]
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
        raise ValueError(f"lr_decay must be in (0, 1] (the factor applied every lr_decay_every "
                         f"steps), got {decay!r}")
    from functional_meta import episodes        # here: it imports TensorFlow
    episodes.check_warp(config["augment_rotate"], config["augment_scale"])
    shape = tuple(config.get("image_shape", ()))
    for name in AUGMENT_FIELDS:
        if config[name] and (regression or len(shape) != 3):
            raise ValueError(f"{name}={config[name]} augments images; data={config['data']!r} "
                             "has none")
    shift = config["augment_shift"]
    if shift and shift >= min(shape[:2]):
        raise ValueError(f"augment_shift={shift} must be smaller than the images "
                         f"({shape[0]}x{shape[1]})")
    if config["family"] == "maml":
        check_positive_int(config, "inner_steps", "test_inner_steps")
        _check_positive_float(config, "inner_lr")
    if config.get("test_n_way") is not None:
        check_positive_int(config, "test_n_way")
    if config["net"] == "conv4":
        check_positive_int(config, "channels")
        if config["pool"] not in ("stride", "max"):
            raise ValueError(f"pool must be 'stride' or 'max', got {config['pool']!r}")
    else:
        hidden = config.get("hidden") or []
        if not hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden must be a list of positive layer widths, got {hidden!r}")


def save_config(out_dir, config):
    """Writes ``config.json`` atomically (temporary file, then rename)."""
    atomic_write(Path(out_dir) / CONFIG_FILE, json.dumps(config, indent=1, sort_keys=True) + "\n")


def load_config(path):
    """The config stored by ``train`` in ``path`` (a run folder, or any folder or checkpoint prefix
    inside one: the nearest ``config.json`` above it)."""
    path = Path(path).resolve()
    for folder in [path] + list(path.parents):
        if (folder / CONFIG_FILE).is_file():
            return read_config(folder / CONFIG_FILE), folder
    raise ValueError(f"no {CONFIG_FILE} in {path} or above it: is it a training output folder?")


def read_config(file):
    """The config in the JSON ``file``, with any field added since it was stored
    (``LATER_DEFAULTS``) at the value that runs had before the field existed."""
    return {**LATER_DEFAULTS, **json.loads(Path(file).read_text())}


def atomic_write(path, text):
    """Writes ``text`` to a temporary file beside ``path`` and renames it over ``path``: a reader
    sees the old file or the new one, never a part."""
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def augment_options(config):
    """The training sampler's ``augment_*`` keyword arguments of a config."""
    return {name: config[name] for name in AUGMENT_FIELDS}


def absolute_data_path(data_path):
    """``data_path`` with each ','-joined path made absolute (relative ones from the working
    directory): a config then names the same files from any working directory (fm-eval,
    ``--resume``), and a relative spelling of the same path is not a config change."""
    return data_path and ",".join(os.path.abspath(p) for p in data_path.split(","))


def check_same_config(stored, config):
    """Raises ``ValueError`` listing the fields (other than ``RUN_FIELDS``) in which ``config``
    differs from the ``stored`` config of the run it would resume."""
    differ = sorted(k for k in set(stored) | set(config)
                    if k not in RUN_FIELDS and stored.get(k) != config.get(k)
                    and not (k == "data_path" and absolute_data_path(stored.get(k))
                             == absolute_data_path(config.get(k))))
    if differ:
        changes = ", ".join(f"{k}: {stored.get(k)!r} -> {config.get(k)!r}" for k in differ)
        raise ValueError(f"cannot resume: the run was started with a different config ({changes})")
