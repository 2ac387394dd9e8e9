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

ALGORITHMS = ("maml", "fomaml", "metasgd", "protonet", "pretrain", "mann", "lstm", "mldg", "erm",
              "imaml", "maml_rl", "pretrain_rl")
# iMAML's fields (functional_meta.imaml), in its configs only: the proximal regularisation lambda
# and the conjugate-gradient iterations of the implicit meta-gradient.
IMAML_DEFAULTS = {"proximal_lambda": 2.0, "cg_steps": 5}
# Supervised classifiers over a fixed label set across domains (functional_meta.mldg).
SUPERVISED_ALGORITHMS = ("mldg", "erm")
# Algorithms of the sequence protocol (functional_meta.mann, functional_meta.sequences).
SEQUENCE_ALGORITHMS = ("mann", "lstm")
# Filters per block of the mann/lstm encoder when backbone='conv4' gives no channels.
SEQUENCE_ENCODER_CHANNELS = 32
LR_MODES = ("fixed", "metasgd", "lslr")
DATA_SOURCES = choices.IMAGE_SOURCES + ("sinusoid",)
CONFIG_FILE = "config.json"
# Fields that may change when a run is resumed (everything else must match the stored config).
RUN_FIELDS = ("steps",)
# Config fields added after runs were first stored, with the value that earlier runs had: a
# config.json without them reads as if it held these (``read_config``).
LATER_DEFAULTS = {"lr_decay_every": 0, "lr_decay": 0.5, "augment_shift": 0, "augment_rotate": 0.0,
                  "augment_scale": 0.0, "domains": ["clean"], "bn": "transductive",
                  "episodes_within_group": False}
AUGMENT_FIELDS = ("augment_shift", "augment_rotate", "augment_scale")
# The same for fields of the MANN/LSTM presets only: their first runs wrote keys, used Adam and
# read the pixels.
SEQUENCE_LATER_DEFAULTS = {"write": "key", "optimizer": "adam", "encoder_channels": 0,
                           "freeze_encoder": False, "pixels": True, "head_inputs": False,
                           "weight_decay": 0.0}
# The optimisers of the MANN/LSTM (``optim.OPTIMIZERS``) and what a MANN head writes
# (``mann.WRITES``); RMSProp's rate when none is given is the MANN paper's.
SEQUENCE_OPTIMIZERS = ("adam", "rmsprop")
SEQUENCE_WRITES = ("add", "key")
RMSPROP_LR = 1e-4


def default_preset(algorithm, data=None):
    """The preset a binary starts from when ``--preset`` is not given."""
    if algorithm == "protonet":
        return "protonet_omniglot"
    if algorithm in SEQUENCE_ALGORITHMS:
        return "mann_omniglot_5way"
    if algorithm in SUPERVISED_ALGORITHMS:
        return "rotated_mnist"
    if algorithm == "pretrain" or data == "sinusoid":
        return "maml_sinusoid"
    if data in ("mnist", "mnist_tfds"):
        return "maml_mnist_mlp"
    return "maml_omniglot_5way"


# MAML for reinforcement learning (functional_meta.maml_rl): maml_rl adapts with inner_steps
# policy-gradient steps; pretrain_rl is the paper's pretrained baseline (one policy trained on
# all tasks at once, inner_steps 0, fine-tuned at test time).
RL_ALGORITHMS = ("maml_rl", "pretrain_rl")
# The task families of functional_meta.envs: observation size and default horizon (here so the
# flags are checked without importing TensorFlow).
RL_ENVS = {"navigation2d": (2, 100), "bandit": (1, 10), "tabular_mdp": (10, 10)}
RL_FIELDS = ("env", "horizon", "trajectories", "meta_batch", "inner_steps", "test_inner_steps",
             "inner_lr", "discount", "outer", "max_kl", "outer_lr", "estimator", "hidden")
# The meta-gradient estimators of functional_meta.maml_rl; first_order is 'maml' without the
# second-order path through the inner step (the config's first_order field says so).
RL_ESTIMATORS = ("exact", "lvc", "maml", "first_order")


def make_rl_config(algorithm, preset="maml_rl_navigation", **overrides):
    """A checked MAML-RL config (``maml_rl`` or ``pretrain_rl``): the preset's fields with the
    non-``None`` ``overrides`` (``RL_FIELDS``); ``env`` changes the horizon to that family's
    default unless ``horizon`` is given."""
    if algorithm not in RL_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {list(RL_ALGORITHMS)}, got {algorithm!r}")
    if preset not in presets.PRESETS or presets.PRESETS[preset]["family"] != "maml_rl":
        names = sorted(n for n, c in presets.PRESETS.items() if c["family"] == "maml_rl")
        raise ValueError(f"preset must be one of {names} for algorithm={algorithm!r}, got "
                         f"{preset!r}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(overrides) - set(RL_FIELDS))
    if unknown:
        raise ValueError(f"algorithm={algorithm!r} has no setting(s) {unknown}")
    # LATER_DEFAULTS too: read_config adds them to every stored config (a resume compares).
    config = dict(LATER_DEFAULTS, **presets.PRESETS[preset])
    if "env" in overrides and overrides["env"] in RL_ENVS:
        overrides.setdefault("horizon", RL_ENVS[overrides["env"]][1])
        if overrides["env"] != "navigation2d":          # a softmax policy over few states
            overrides.setdefault("hidden", [32, 32])
    config.update(overrides, preset=preset, algorithm=algorithm)
    config["first_order"] = config["estimator"] == "first_order"
    if algorithm == "pretrain_rl":
        if overrides.get("inner_steps"):
            raise ValueError("algorithm='pretrain_rl' trains without adaptation; leave "
                             "inner_steps unset")
        config["inner_steps"] = 0
    check_rl_config(config)
    return json.loads(json.dumps(config))


def check_rl_config(config):
    """``ValueError`` naming the field (the binaries' flag) and its allowed range."""
    if config.get("env") not in RL_ENVS:
        raise ValueError(f"env must be one of {sorted(RL_ENVS)}, got {config.get('env')!r}")
    check_positive_int(config, "horizon", "trajectories", "meta_batch", "test_inner_steps")
    steps = config.get("inner_steps")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0 \
            or (steps == 0) != (config["algorithm"] == "pretrain_rl"):
        raise ValueError(f"inner_steps must be a positive integer for maml_rl (0 only for "
                         f"pretrain_rl), got {steps!r}")
    _check_positive_float(config, "inner_lr", "max_kl", "outer_lr")
    if not isinstance(config.get("discount"), (int, float)) or not 0 < config["discount"] <= 1:
        raise ValueError(f"discount must be in (0, 1], got {config.get('discount')!r}")
    if config.get("outer") not in ("trpo", "adam"):
        raise ValueError(f"outer must be 'trpo' or 'adam', got {config.get('outer')!r}")
    if config.get("estimator") not in RL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {list(RL_ESTIMATORS)}, got "
                         f"{config.get('estimator')!r}")
    hidden = config.get("hidden") or []
    if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
        raise ValueError(f"hidden must be a list of positive layer widths, got {hidden!r}")
    features = 2 * RL_ENVS[config["env"]][0] + 4           # the linear baseline's
    if config["trajectories"] * config["horizon"] < features:
        raise ValueError(f"trajectories={config['trajectories']} x horizon={config['horizon']} "
                         f"steps per task cannot fit the {features}-feature baseline of "
                         f"env={config['env']!r}; raise trajectories (K)")


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
                augment_scale=0.0, domains=None, proximal_lambda=None, cg_steps=None,
                bn="transductive", backbone=None, episodes_within_group=False, **overrides):
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
    ``protonet``, ``pretrain`` (the sinusoid baseline: one network regressed on the mixture of
    tasks, fine-tuned at test time like MAML), ``mann`` (memory-augmented network, Santoro et al.
    2016) or ``lstm`` (its baseline without memory); for the last two ``n_way`` is the classes and
    ``k_shot`` the instances per class of a sequence (``functional_meta.sequences``). ``lr_mode='lslr'`` with ``maml`` gives MAML++'s
    per-layer per-step learned rates. ``mldg`` (Li et al. 2018) and ``erm`` (pooled) train a
    supervised classifier of ``n_way`` classes across ``domains`` (``functional_meta.mldg``).
    ``imaml``: implicit MAML (``functional_meta.imaml``) with ``proximal_lambda`` and ``cg_steps``
    (``IMAML_DEFAULTS`` when ``None``), fields of its configs only.

    ``bn``: ``'transductive'`` (batch norm from the whole episode) or ``'support'`` (ProtoNet
    only: from the support set alone, as ``fm-eval --bn=support`` scores).

    ``episodes_within_group``: every training episode's classes from one group (an Omniglot
    alphabet; ``episodes.EpisodeSampler``'s ``within_group``).

    ``backbone``: the network of a preset with a convolutional one, stored as the config's
    ``net``: ``'conv4'`` or ``'resnet12'`` (``nets.resnet12``, widths from ``channels`` by
    ``presets.resnet12_widths``); ``None`` keeps the preset's. For ``mann`` and ``lstm``,
    ``'conv4'`` adds a convolutional encoder of ``channels`` filters (default
    ``SEQUENCE_ENCODER_CHANNELS``) whose features the controller reads beside the pixels, stored
    as ``encoder_channels``.

    ``domains``: the training domains (``functional_meta.domains`` names, a list or a ','-joined
    string; default ``['clean']``), stored in canonical spelling. Episodic learners draw each
    episode within one of them.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {list(ALGORITHMS)}, got {algorithm!r}")
    if algorithm in RL_ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r} is configured by make_rl_config")
    preset = preset or default_preset(algorithm, data)
    if preset not in presets.PRESETS:
        raise ValueError(f"preset must be one of {sorted(presets.PRESETS)}, got {preset!r}")
    config = presets.get(preset, **{k: v for k, v in overrides.items() if k in presets.PRESETS[preset]
                                    or k in ("hidden", "channels", "pool", "test_n_way")})
    unknown = sorted(k for k, v in overrides.items() if k not in config and v is not None)
    if unknown:
        raise ValueError(f"preset {preset!r} has no field(s) {unknown}")
    if backbone is not None:
        check_backbone(backbone, preset, overrides.get("pool"))
        config["net"] = backbone
    family = "protonet" if algorithm == "protonet" else "maml"
    if algorithm in SEQUENCE_ALGORITHMS:
        family = "mann"
        config["net"] = algorithm            # the MANN, or the LSTM baseline without memory
        if config.get("channels") is not None and backbone is None:
            raise ValueError("channels is the width of the encoder of mann/lstm: give it with "
                             "backbone='conv4' (without, the controller reads the pixels)")
        channels = config.pop("channels", None)
        config["encoder_channels"] = (channels or SEQUENCE_ENCODER_CHANNELS) if backbone else 0
        config["freeze_encoder"], config["pixels"], config["head_inputs"] = False, True, False
    if algorithm in SUPERVISED_ALGORITHMS:
        family = "supervised"
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
    if family in ("protonet", "mann") and lr_mode != "fixed":
        raise ValueError(f"lr_mode applies to MAML's inner loop; {algorithm} has none")
    if algorithm == "pretrain" and lr_mode != "fixed":
        raise ValueError("algorithm='pretrain' fine-tunes with a fixed inner_lr; leave lr_mode unset")
    imaml_fields = {"proximal_lambda": proximal_lambda, "cg_steps": cg_steps}
    if algorithm == "imaml":
        if lr_mode != "fixed":
            raise ValueError("algorithm='imaml' adapts with a fixed inner_lr; leave lr_mode unset")
        config.update({k: IMAML_DEFAULTS[k] if v is None else v for k, v in imaml_fields.items()})
    elif any(v is not None for v in imaml_fields.values()):
        raise ValueError("proximal_lambda and cg_steps apply to algorithm='imaml' only")
    if metric not in choices.METRICS:
        raise ValueError(f"metric must be one of {list(choices.METRICS)}, got {metric!r}")
    if bn not in choices.BN_MODES:
        raise ValueError(f"bn must be one of {list(choices.BN_MODES)}, got {bn!r}")
    if bn != "transductive" and algorithm != "protonet":
        raise ValueError(f"bn={bn!r} trains ProtoNet only; {algorithm} trains with the batch's "
                         "statistics (score it inductively with fm-eval --bn=support)")
    if config.get("optimizer") == "rmsprop" and overrides.get("outer_lr") is None:
        config["outer_lr"] = RMSPROP_LR          # the presets' rate is Adam's
    config.update(preset=preset, algorithm=algorithm, lr_mode=lr_mode, metric=metric,
                  first_order=algorithm == "fomaml", lr_decay_every=lr_decay_every,
                  lr_decay=lr_decay, augment_shift=augment_shift, augment_rotate=augment_rotate,
                  augment_scale=augment_scale, bn=bn,
                  episodes_within_group=bool(episodes_within_group))
    if data is not None:
        config["data"] = data
    config["domains"] = domain_names(["clean"] if domains is None else domains)
    check_config(config)
    return json.loads(json.dumps(config))        # tuples -> lists: the same dict config.json holds


def check_backbone(backbone, preset, pool=None):
    """``ValueError`` naming ``backbone`` unless it is one of ``presets.IMAGE_NETS`` and ``preset``
    has a convolutional network; naming ``pool`` (conv4's) if given with ``'resnet12'``."""
    net = presets.PRESETS[preset]["net"]
    if net == "mann":
        if backbone != "conv4" or pool is not None:
            raise ValueError(f"backbone for mann/lstm must be 'conv4' (an encoder before the "
                             f"controller, no pool option), got backbone={backbone!r}, "
                             f"pool={pool!r}")
        return
    if backbone not in presets.IMAGE_NETS or net not in presets.IMAGE_NETS:
        raise ValueError(f"backbone must be one of {list(presets.IMAGE_NETS)} on a preset with a "
                         f"convolutional network, got backbone={backbone!r} for preset={preset!r} "
                         f"(net {net!r})")
    if backbone == "resnet12" and pool is not None:
        raise ValueError("pool is conv4's downsampling; backbone='resnet12' max-pools after every "
                         "block")


def check_config(config):
    """Raises ``ValueError`` naming the field (the binaries' flag of the same name) if a config
    cannot be trained; run before anything is loaded or compiled."""
    if config.get("algorithm") in RL_ALGORITHMS:
        return check_rl_config(config)
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
    if config["family"] == "mann":      # n_way classes x k_shot instances, no query set
        check_positive_int(config, "n_way", "k_shot", "meta_batch")
    elif config["family"] == "supervised":
        _check_supervised(config)
    else:
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
    names = domain_names(config.get("domains", ["clean"]))
    if names != ["clean"] and (regression or len(config.get("image_shape", ())) != 3):
        raise ValueError(f"domains={names} are image styles; data={config['data']!r} has no images")
    if config["family"] == "supervised" and config["algorithm"] == "mldg" \
            and len(names) <= config["meta_test"]:
        raise ValueError(f"mldg needs more domains than meta_test={config['meta_test']} (its "
                         f"meta-test domains per step), got {len(names)}: {names}")
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
    if config["algorithm"] == "imaml":
        _check_positive_float(config, "proximal_lambda")
        check_positive_int(config, "cg_steps")
    if config.get("test_n_way") is not None:
        check_positive_int(config, "test_n_way")
    if config["family"] == "mann":
        check_positive_int(config, "controller", "memory_slots", "memory_size", "read_heads")
        encoder = config.get("encoder_channels", 0)
        if isinstance(encoder, bool) or not isinstance(encoder, (int, np.integer)) or encoder < 0:
            raise ValueError(f"encoder_channels must be 0 (pixels) or a positive integer, got "
                             f"{encoder!r}")
        for name, default in (("freeze_encoder", False), ("pixels", True)):
            value = config.get(name, default)
            if value not in (False, True) or (value != default and not encoder):
                raise ValueError(f"{name} must be true or false, and {str(not default).lower()} "
                                 f"only with an encoder (encoder_channels > 0), got {value!r}")
        if config.get("head_inputs", False) not in (False, True) \
                or config.get("head_inputs") and config["net"] != "mann":
            raise ValueError(f"head_inputs must be true or false, and true only for the MANN "
                             f"(the LSTM has no memory heads), got {config.get('head_inputs')!r}")
        _check_positive_float(config, "clip_norm")
        decay = config.get("weight_decay", 0.0)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not decay >= 0:
            raise ValueError(f"weight_decay must be a number >= 0 (0 = none), got {decay!r}")
        for name, allowed in (("optimizer", SEQUENCE_OPTIMIZERS), ("write", SEQUENCE_WRITES)):
            if config.get(name, allowed[-1]) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {config[name]!r}")
        if config["read_heads"] > config["memory_slots"]:
            raise ValueError(f"read_heads={config['read_heads']} must not exceed memory_slots="
                             f"{config['memory_slots']}")
        gamma = config["gamma"]
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
            raise ValueError(f"gamma (the usage decay) must be in [0, 1], got {gamma!r}")
    elif config["net"] in presets.IMAGE_NETS:
        check_positive_int(config, "channels")
        if config["net"] == "conv4" and config["pool"] not in ("stride", "max"):
            raise ValueError(f"pool must be 'stride' or 'max', got {config['pool']!r}")
    else:
        hidden = config.get("hidden") or []
        if not hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden must be a list of positive layer widths, got {hidden!r}")


def domain_names(names):
    """Canonical domain names of a list or ','-joined string (``domains.parse_list``);
    ``ValueError`` naming ``domains`` and the allowed forms."""
    from functional_meta import domains        # here: it imports TensorFlow
    try:
        return domains.parse_list(names)
    except ValueError as error:
        raise ValueError(f"domains: {error}") from None


def _check_supervised(config):
    """The fields of an MLDG/ERM config (``functional_meta.mldg``)."""
    check_positive_int(config, "n_way", "batch_size", "meta_test", "eval_batch")
    _check_positive_float(config, "inner_lr")
    if config.get("lr_mode", "fixed") != "fixed":
        raise ValueError(f"lr_mode applies to MAML's inner loop; {config['algorithm']} has a "
                         "fixed inner_lr (MLDG's virtual step)")
    beta = config["beta"]
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < math.inf:
        raise ValueError(f"beta (MLDG's meta-test weight) must be a non-negative number, got "
                         f"{beta!r}")
    for name in AUGMENT_FIELDS:
        if config[name]:
            raise ValueError(f"{name}={config[name]}: {config['algorithm']} trains without "
                             "augmentation (its domains are the styles)")


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
    (``LATER_DEFAULTS``, and ``SEQUENCE_LATER_DEFAULTS`` for the MANN and LSTM) at the value that
    runs had before the field existed."""
    config = {**LATER_DEFAULTS, **json.loads(Path(file).read_text())}
    if config.get("family") == "mann":
        config = {**SEQUENCE_LATER_DEFAULTS, **config}
    return config


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
