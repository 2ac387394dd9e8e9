"""Meta-training and evaluation loops shared by every algorithm, with explicit arguments only.

The pieces, in the order a binary uses them (after ``configs.make_config``):

- ``meta_splits``: disjoint meta-train/val/test classes, by alphabet (group) lists or by fractions.
- ``make_sampler``: an episode sampler for image classes or sinusoid tasks; batch ``i`` is a pure
  function of ``(seed, i)``, so the sampler's whole state is the number of consumed batches.
- ``make_learner``: ``init(seed) -> state`` and the compiled ``step(state, batch) -> (state, metrics)``
  of MAML / FOMAML / Meta-SGD / MAML++ LSLR / ProtoNet, the jointly pretrained sinusoid baseline,
  or the memory-augmented network and its LSTM baseline (``functional_meta.mann``, on
  ``functional_meta.sequences`` batches).
- ``make_evaluator`` and ``evaluate``: per-episode accuracy (or MSE; for sequences also the
  accuracy at each instance number) over held-out episodes and the 95% interval of their mean;
  ``pixel_baseline`` is nearest neighbour on raw pixels.
- ``train``: the loop, with progress lines, TensorBoard summaries, validation, best/latest
  checkpoints (``functional_meta.checkpoints``), exact resume (logs included), and a stop on the
  first non-finite loss or a diverging one (``divergence_threshold``).
"""

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.core.framework import summary_pb2
from tensorflow.core.util import event_pb2

from functional_meta import data as data_lib
from functional_meta import (checkpoints, configs, devices, distribute, domains, episodes, maml,
                             mann, metrics, mldg, optim, presets, protonet)
from functional_meta import sequences as sequences_lib

HISTORY_FILE = "history.jsonl"
# Episodes per evaluation batch (validation and test); the last batch is cut to the count asked.
EVAL_BATCH = 25
# An evaluation longer than this logs how far it is, at most this often.
EVAL_PROGRESS_SECONDS = 60.0


def default_jit(algorithm):
    """MAML-style steps compile with XLA everywhere; ProtoNet's only on GPU (oneDNN convolutions
    beat XLA's on CPU), and so the recurrent MANN and LSTM (docs/mann.md: XLA's loop ran them
    slower on CPU). The target is ``devices.kind()``; the choice is ``devices.default_jit``'s."""
    return devices.default_jit(algorithm)


# Input values per MAML chunk on a CPU: 80 Omniglot images (28x28x1), 8 tasks of config A and 2 of
# the 20-way preset. Chunks of about this size ran fastest on two cores, and keep a quarter or less
# of the meta-batch's activations alive (docs/design.md, task chunks).
CHUNK_VALUES = 80 * 28 * 28


def default_task_chunk(config, replicas=1):
    """MAML's ``task_chunk`` (see ``maml.train_step_parts``) for ``config``'s meta-batch split over
    ``replicas``.

    For a conv4 network on a CPU: the largest divisor of the meta-batch (per replica) whose chunk
    of tasks holds at most ``CHUNK_VALUES`` support and query input values, so that the chunk's
    activations stay in the caches. ``None`` (the whole meta-batch at once) when that is all of
    it, for an MLP (its activations are small), and on a GPU (it has the parallelism to use the
    whole batch; ``devices.Choices.task_chunks``, for the target ``devices.kind()``).
    """
    tasks = config["meta_batch"] // replicas
    if config["net"] != "conv4" or not devices.choices().task_chunks:
        return None
    per_task = config["n_way"] * (config["k_shot"] + config["q_query"]) \
        * math.prod(config["image_shape"])
    chunk = max(d for d in range(1, tasks + 1) if tasks % d == 0 and
                (d == 1 or d * per_task <= CHUNK_VALUES))
    return None if chunk == tasks else chunk


# ----------------------------------------------------------------------------------------------
# Data: class splits and samplers


def unrotated(data):
    """Only the original classes of a rotation-augmented ``ClassData`` (rotations are for training)."""
    suffixes = tuple(f"/rot{r}" for r in data_lib.ROTATIONS)
    return data_lib.subset(data, [i for i, n in enumerate(data.names) if not n.endswith(suffixes)])


def meta_splits(data, *, train_groups=None, val_groups=None, test_groups=None, exclude_groups=None,
                fractions=(0.7, 0.1, 0.2), val_fraction=0.1, seed=0):
    """Disjoint ``(train, val, test)`` ``ClassData`` of ``data``; val and test lose rotated copies.

    Group mode (``train_groups`` or ``test_groups`` given, e.g. Omniglot alphabets): each list
    selects its groups; a missing ``train_groups`` means every group not in val/test, a missing
    ``test_groups`` every group not in train/val. Without ``val_groups``, validation holds out
    ``val_fraction`` of the training classes (a class and its rotations together). Otherwise
    ``fractions`` (train, val, test) split the groups at random with ``seed``
    (``data.split_classes``). ``exclude_groups`` are dropped first. A group in two lists is an error.
    """
    if exclude_groups:
        data = data_lib.exclude_groups(data, exclude_groups)
    lists = {"train_groups": train_groups, "val_groups": val_groups, "test_groups": test_groups}
    lists = {k: list(v) for k, v in lists.items() if v}
    names = list(lists)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(set(lists[a]) & set(lists[b]))
            if shared:
                raise ValueError(f"{a} and {b} share {shared}; meta-train/val/test must not overlap")
    for name, groups in lists.items():
        try:
            data_lib.select_groups(data, groups)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
    if "train_groups" in lists or "test_groups" in lists:
        val_set = set(lists.get("val_groups", []))
        test_set = set(lists.get("test_groups", []))
        train_set = set(lists.get("train_groups", [])) or set(data.groups) - val_set - test_set
        if "test_groups" not in lists:
            test_set = set(data.groups) - train_set - val_set
        train = data_lib.subset(data, [i for i, g in enumerate(data.groups) if g in train_set])
        test = data_lib.subset(data, [i for i, g in enumerate(data.groups) if g in test_set])
        if val_set:
            val = data_lib.subset(data, [i for i, g in enumerate(data.groups) if g in val_set])
        elif val_fraction:
            if not 0 < val_fraction < 1:
                raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
            train, val = data_lib.split_classes(train, [1 - val_fraction, val_fraction], seed,
                                                by_group=False)
        else:
            val = data_lib.subset(data, [])
    else:
        fractions = [float(f) for f in fractions]
        if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) > 1 + 1e-9:
            raise ValueError(f"split fractions must be three non-negative numbers (train, val, "
                             f"test) summing to at most 1, got {fractions}")
        train, val, test = data_lib.split_classes(data, fractions, seed, by_group=True)
    return train, unrotated(val), unrotated(test)


def load_splits(config):
    """``(train, val, test)`` ``ClassData`` of a config's data settings (``data``, ``data_path``,
    ``rotations``, ``*_groups``, ``split``, ``val_fraction``, ``split_seed``; see ``meta_splits``),
    or three ``None`` for sinusoid tasks."""
    if config["data"] == "sinusoid":
        return None, None, None
    shape = tuple(config.get("image_shape", (28, 28, 1)))
    data = data_lib.load(config["data"], config.get("data_path"), image_size=shape[0],
                         rotations=config.get("rotations", False), image_shape=shape,
                         seed=config.get("split_seed", 0))
    return meta_splits(
        data, train_groups=config.get("train_groups"), val_groups=config.get("val_groups"),
        test_groups=config.get("test_groups"), exclude_groups=config.get("exclude_groups"),
        fractions=config.get("split", (0.7, 0.1, 0.2)), val_fraction=config.get("val_fraction", 0),
        seed=config.get("split_seed", 0))


def check_split(split, name, n_way, k_shot, q_query):
    """Raises ``ValueError`` naming the split and ``n_way``/``k_shot``/``q_query`` if ``split`` cannot
    give such episodes."""
    if len(split) < n_way:
        raise ValueError(f"n_way={n_way} but the {name} split has {len(split)} classes")
    smallest = min(len(x) for x in split.images)
    if k_shot + q_query > smallest:
        raise ValueError(f"k_shot + q_query = {k_shot + q_query} but a class of the {name} split "
                         f"has only {smallest} images")


def make_sampler(classes, *, n_way, k_shot, q_query, meta_batch, seed, augment_shift=0,
                 augment_rotate=0.0, augment_scale=0.0, sequences=False, domain_names=None,
                 within_group=False):
    """``EpisodeSampler`` over ``classes`` (a ``ClassData``), or ``SinusoidSampler`` when
    ``classes`` is ``None``; ``n_way`` is ignored for sinusoids. The ``augment_*`` settings are for
    the training sampler only (a config's fields, ``augment_options``); evaluation samplers keep
    the defaults, no augmentation. ``sequences=True`` (the MANN and LSTM, ``is_sequence``): a
    ``sequences.SequenceSampler`` of ``n_way`` classes x ``k_shot`` instances (``q_query``
    unused). ``domain_names`` (a config's ``domains``) other than ``['clean']``: a
    ``domains.DomainEpisodeSampler``, each episode within one of those domains.
    ``within_group``: every episode's classes from one group (``EpisodeSampler``); image
    episodes of the clean domain only."""
    if within_group and (sequences or classes is None
                         or (domain_names and list(domain_names) != ["clean"])):
        raise ValueError("within_group (--episodes_within_group) draws support/query image "
                         "episodes of the clean domain; not sequences, sinusoids or --domains")
    if domain_names and list(domain_names) != ["clean"]:
        if sequences or classes is None:
            raise ValueError(f"domains={list(domain_names)} need image episodes")
        return domains.DomainEpisodeSampler(
            classes, domain_names, n_way, k_shot, q_query, meta_batch=meta_batch, seed=seed,
            augment_shift=augment_shift, augment_rotate=augment_rotate,
            augment_scale=augment_scale)
    if sequences:
        return sequences_lib.SequenceSampler(
            classes, n_way, k_shot, meta_batch=meta_batch, seed=seed, augment_shift=augment_shift,
            augment_rotate=augment_rotate, augment_scale=augment_scale)
    if classes is None:
        if augment_shift or augment_rotate or augment_scale:
            raise ValueError("augment_* change images; sinusoid tasks have none")
        return episodes.SinusoidSampler(meta_batch, k_shot, q_query, seed)
    return episodes.EpisodeSampler(classes, n_way, k_shot, q_query, meta_batch=meta_batch,
                                   seed=seed, augment_shift=augment_shift,
                                   augment_rotate=augment_rotate, augment_scale=augment_scale,
                                   within_group=within_group)


# ----------------------------------------------------------------------------------------------
# Learners and evaluation


class Learner(NamedTuple):
    """What the loop needs of an algorithm. ``init(seed) -> state`` (a dict of tensors);
    ``step(state, batch) -> (state, {'loss'[, 'accuracy']})``; ``apply(weights, x)`` the network."""
    config: dict
    init: Callable
    step: Callable
    apply: Callable


def make_learner(config, jit_compile=None, strategy=None, task_chunk=None):
    """The ``Learner`` of ``config['algorithm']`` (``jit_compile=None``: ``default_jit``).

    With a ``tf.distribute`` ``strategy`` the step splits each meta-batch over its replicas
    (``functional_meta.distribute``); the result equals the single-device step. ``task_chunk``
    (MAML-style algorithms; ``None``: ``default_task_chunk``): see ``maml.train_step_parts``; a
    speed setting with the same result, not part of the config.
    """
    configs.check_config(config)
    if config["algorithm"] in configs.RL_ALGORITHMS:
        return _rl_learner(config, jit_compile, strategy, task_chunk)
    if task_chunk is not None and config["algorithm"] in ("protonet", "pretrain", "mann", "lstm"):
        raise ValueError(f"task_chunk={task_chunk} needs a MAML-style algorithm")
    if jit_compile is None:
        jit_compile = default_jit(config["algorithm"])
    init, apply = presets.network(config)
    outer_lr = outer_rate(config)
    if strategy is not None and config["algorithm"] in ("pretrain", "mann", "lstm"):
        raise ValueError(f"{config['algorithm']} runs on one device only (no --strategy)")
    if is_sequence(config):
        optimizer = config.get("optimizer", "adam")
        frozen = 2 * mann.ENCODER_BLOCKS if config.get("freeze_encoder") else 0
        step = mann.make_train_step(apply, outer_lr, config["clip_norm"], jit_compile, optimizer,
                                    config.get("weight_decay", 0.0), frozen)
        return Learner(config, lambda seed: mann.init_state(init(seed), optimizer), step, apply)
    if is_supervised(config):
        if strategy is not None:
            raise ValueError(f"{config['algorithm']} runs on one device only (no --strategy)")
        options = {} if config["algorithm"] == "erm" else dict(
            inner_lr=config["inner_lr"], beta=config["beta"], meta_test=config["meta_test"])
        step = mldg.make_train_step(apply, config["algorithm"], lr=outer_lr,
                                    jit_compile=jit_compile, loss=config["loss"], **options)
        return Learner(config, lambda seed: mldg.init_state(init(seed)), step, apply)
    if config["algorithm"] == "protonet":
        step = distribute.make_train_step(
            strategy, "protonet", apply, meta_batch=config["meta_batch"], jit_compile=jit_compile,
            n_way=config["n_way"], lr=outer_lr, metric=config["metric"],
            bn=config.get("bn", "transductive"))
        return Learner(config, lambda seed: protonet.init_state(init(seed)), step, apply)

    def init_state(seed):
        return maml.init_state(init(seed), config["inner_lr"], config["lr_mode"],
                               config["inner_steps"])

    if config["algorithm"] == "pretrain":
        return Learner(config, init_state, _pretrain_step(apply, outer_lr, jit_compile), apply)
    if config["algorithm"] == "imaml":
        if strategy is not None:
            raise ValueError("imaml runs on one device only (no --strategy)")
        from functional_meta import imaml
        step = imaml.make_train_step(
            apply, inner_steps=config["inner_steps"], lam=config["proximal_lambda"],
            cg_steps=config["cg_steps"], outer_lr=outer_lr, loss=config["loss"],
            jit_compile=jit_compile, task_chunk=task_chunk or default_task_chunk(config))
        return Learner(config, init_state, step, apply)
    step = distribute.make_train_step(
        strategy, "maml", apply, meta_batch=config["meta_batch"], jit_compile=jit_compile,
        inner_steps=config["inner_steps"], outer_lr=outer_lr,
        first_order=config["first_order"], loss=config["loss"],
        task_chunk=task_chunk or default_task_chunk(
            config, strategy.num_replicas_in_sync if strategy is not None else 1))
    return Learner(config, init_state, step, apply)


def rl_parts(config):
    """``(env, policy, settings)`` of a MAML-RL config (``functional_meta.maml_rl``)."""
    from functional_meta import envs, maml_rl
    env = envs.make(config["env"], config["horizon"])
    policy = maml_rl.default_policy(env, tuple(config["hidden"]))
    settings = maml_rl.Settings(
        trajectories=config["trajectories"], inner_steps=config["inner_steps"],
        inner_lr=config["inner_lr"], discount=config["discount"],
        first_order=config["first_order"],
        estimator="maml" if config["first_order"] else config["estimator"])
    return env, policy, settings


def _rl_learner(config, jit_compile, strategy, task_chunk):
    """MAML-RL (or its pretrained baseline): the state is the policy's weights and the outer
    optimiser's; a batch is ``(tasks, seed pair)`` from ``envs.TaskSampler``."""
    from functional_meta import maml_rl
    if strategy is not None or task_chunk is not None:
        raise ValueError(f"{config['algorithm']} runs on one device, whole meta-batch (no "
                         "--strategy, no --task_chunk)")
    env, policy, settings = rl_parts(config)
    step = maml_rl.make_train_step(env, policy, settings, outer=config["outer"],
                                   outer_lr=config["outer_lr"], max_kl=config["max_kl"],
                                   jit_compile=True if jit_compile is None else jit_compile)
    return Learner(config, lambda seed: maml_rl.init_state(policy, seed, config["outer"]), step,
                   policy.distribution)


def rl_sampler(config, seed):
    """The training task sampler of a MAML-RL config: batch ``i`` is ``(tasks, seed pair)``, a
    pure function of ``(seed, i)``."""
    from functional_meta import envs
    return envs.TaskSampler(envs.make(config["env"], config["horizon"]), config["meta_batch"],
                            seed)


def is_supervised(config):
    """Whether ``config`` trains a fixed-label-set classifier across domains (MLDG, ERM)."""
    return config["algorithm"] in configs.SUPERVISED_ALGORITHMS


# The images of each training domain held out for validation (DomainBed's training-domain
# validation, holdout fraction 0.2).
DOMAIN_VAL_FRACTION = 0.2


def domain_splits(config, data=None):
    """MLDG/ERM data: ``(train, val, held_out)``. Each class's images are cut into one disjoint
    part per training domain (``config['domains']``) plus one held out (``domains.partition``,
    seed ``split_seed``), as DomainBed's Rotated MNIST gives each domain its own digits; each
    training part, in its domain's style, keeps ``1 - DOMAIN_VAL_FRACTION`` of its images for
    training (``train``, a list of ``ClassData``) and the rest for validation (``val``, one
    ``ClassData`` per domain). ``held_out`` is the last part, unstyled: ``fm-eval
    --test_domain`` styles it. ``data``: the loaded ``ClassData`` (default: ``config``'s source).
    """
    if data is None:
        shape = tuple(config["image_shape"])
        data = data_lib.load(config["data"], config.get("data_path"), image_size=shape[0],
                             image_shape=shape, seed=config.get("split_seed", 0))
    if len(data) != config["n_way"]:
        raise ValueError(f"n_way={config['n_way']} classes in the config but the data has "
                         f"{len(data)}: a fixed-label-set classifier needs them equal")
    names = config["domains"]
    seed = config.get("split_seed", 0)
    parts = domains.partition(data, len(names) + 1, seed)
    train, val = [], []
    for part, name in zip(parts, names):
        styled = domains.apply(part, name, seed)
        cut = [max(1, round(len(x) * DOMAIN_VAL_FRACTION)) for x in styled.images]
        kept = data_lib.ClassData([x[c:] for x, c in zip(styled.images, cut)], styled.names,
                                  styled.groups)
        held = data_lib.ClassData([x[:c] for x, c in zip(styled.images, cut)], styled.names,
                                  styled.groups)
        train.append(kept)
        val.append(held)
    return train, val, parts[-1]


def supervised_validator(learner, parts, jit_compile=None):
    """``validate(state) -> {'accuracy', 'accuracy_ci95'}`` of an MLDG/ERM learner over the images
    of ``parts`` (``ClassData`` of the same classes, e.g. ``domain_splits``' ``val``), scored in
    batches of the config's ``eval_batch``."""
    if jit_compile is None:
        jit_compile = default_jit(learner.config["algorithm"])
    hits = mldg.make_eval_step(learner.apply, jit_compile)
    labelled = [domains.labelled(p) for p in parts]
    x = np.concatenate([a for a, _ in labelled])
    y = np.concatenate([b for _, b in labelled])

    def validate(state):
        return mldg.evaluate(hits, state["weights"], x, y, learner.config["eval_batch"])
    return validate


def is_sequence(config):
    """Whether ``config`` trains on label-offset sequences (the MANN and its LSTM baseline)."""
    return config["algorithm"] in configs.SEQUENCE_ALGORITHMS


def outer_rate(config):
    """The meta-optimiser's rate: ``outer_lr``, or with ``lr_decay_every`` > 0 the schedule
    ``optim.step_decay(outer_lr, lr_decay_every, lr_decay)``, evaluated inside the compiled step
    from the Adam step count of the state."""
    every = config["lr_decay_every"]
    if not every:
        return config["outer_lr"]
    return optim.step_decay(config["outer_lr"], int(every), float(config["lr_decay"]))


def _pretrain_step(apply, outer_lr, jit_compile):
    """The MAML paper's sinusoid baseline: one network regressed on all points of all tasks at
    once (the mixture of tasks), with Adam; the inner rate is kept for test-time fine-tuning."""

    @tf.function(jit_compile=jit_compile, autograph=False)
    def step(state, tasks):
        support_x, support_y, query_x, query_y = tasks
        x = tf.concat([support_x, query_x], axis=1)
        y = tf.concat([support_y, query_y], axis=1)
        weights = state["weights"]
        with tf.GradientTape() as tape:
            tape.watch(weights)
            loss = tf.reduce_mean(maml.mse(apply(weights, x), y))
        weights, opt = optim.adam_update(tape.gradient(loss, weights), weights, state["opt"],
                                         outer_lr)
        return {"weights": weights, "inner_lr": state["inner_lr"], "opt": opt}, {"loss": loss}

    return step


def make_evaluator(config, apply, *, inner_steps=None, n_way=None, jit_compile=None, bn=None,
                   adapt=None):
    """``evaluator(state, batch) -> {'accuracy': [B]}`` (classification; MAML adds ``'loss'``) or
    ``{'mse': [B]}`` (regression), numpy, one value per episode.

    MAML-family learners adapt for ``inner_steps`` (default ``test_inner_steps``) on each support
    set; their head fixes ``n_way`` to the training way. ProtoNet takes any ``n_way``. ``bn``:
    batch norm's statistics for the queries, ``'transductive'`` (the batch scored, as in training)
    or ``'support'`` (the support set's alone, so each query is scored independently;
    ``nets.support_rows``); default: the config's ``bn``, how it was trained. MANN/LSTM networks
    have no batch norm and take only ``'transductive'``. ``adapt``: ProtoNet's test-time
    adaptation, ``adaptation.make_eval_step``'s ``steps``, ``lr``, ``views``, ``query_views`` and
    ``transductive_steps`` as a dict.
    """
    bn = bn or config.get("bn", "transductive")
    if jit_compile is None:
        jit_compile = default_jit(config["algorithm"])
    if is_sequence(config):
        if bn != "transductive":
            raise ValueError(f"bn={bn!r}: the {config['algorithm']} network has no batch norm")
        return _sequence_evaluator(config, apply, n_way, jit_compile, sequence_views(adapt))
    n_way = n_way or (config.get("test_n_way") or config["n_way"])
    if adapt and config["algorithm"] != "protonet":
        raise ValueError(f"test-time fine-tuning, augmentation and refinement (--finetune_steps, "
                         f"--tta, --tta_queries, --transductive_steps) are for ProtoNet; this "
                         f"checkpoint is {config['algorithm']}")
    if config["algorithm"] == "protonet":
        if adapt:
            from functional_meta import adaptation
            eval_step = adaptation.make_eval_step(apply, n_way, metric=config["metric"],
                                                  jit_compile=jit_compile, bn=bn, **adapt)
        else:
            eval_step = protonet.make_eval_step(apply, n_way, config["metric"], jit_compile, bn)

        def evaluate_protonet(state, batch):
            accuracy, _ = eval_step(state["weights"], batch)
            return {"accuracy": np.asarray(accuracy, np.float64)}
        return evaluate_protonet

    regression = config["loss"] == "mse"
    if not regression and n_way != config["n_way"]:
        raise ValueError(f"n_way={n_way}, but this MAML network's head has {config['n_way']} "
                         f"outputs: evaluate it {config['n_way']}-way")
    inner_steps = inner_steps or config["test_inner_steps"]
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
        raise ValueError(f"inner_steps must be a positive integer, got {inner_steps!r}")
    if config["algorithm"] == "imaml":      # test-time adaptation solves the proximal problem
        if bn != "transductive":
            raise ValueError(f"bn={bn!r}: imaml evaluates with the batch's own statistics only")
        from functional_meta import imaml
        eval_step = imaml.make_eval_step(apply, inner_steps=inner_steps,
                                         lam=config["proximal_lambda"], loss=config["loss"],
                                         jit_compile=jit_compile)
    else:
        eval_step = maml.make_eval_step(apply, inner_steps=inner_steps, loss=config["loss"],
                                        jit_compile=jit_compile, bn=bn)

    def evaluate_maml(state, batch):
        losses, accuracy = eval_step(state["weights"], state["inner_lr"], batch)
        if regression:
            return {"mse": np.asarray(losses, np.float64)}
        return {"accuracy": np.asarray(accuracy, np.float64), "loss": np.asarray(losses, np.float64)}
    return evaluate_maml


def make_ensemble_evaluator(members, n_way, *, jit_compile=None, bn=None, adapt=None):
    """``evaluator(states, batch) -> {'accuracy': [B], 'member_<i>': [B], ...}``, the accuracy of
    an ensemble of ProtoNet checkpoints (``adaptation.make_ensemble_eval_step``) and of each
    member alone: ``members`` holds ``(config, apply)`` pairs and ``states`` their states in the
    same order; ``bn`` (default: each config's) and ``adapt`` as in ``make_evaluator``, the same
    for every member."""
    from functional_meta import adaptation
    for config, _ in members:
        if config["algorithm"] != "protonet":
            raise ValueError(f"an ensemble is of ProtoNet checkpoints; one is "
                             f"{config['algorithm']}")
    jit_compile = default_jit("protonet") if jit_compile is None else jit_compile
    step = adaptation.make_ensemble_eval_step(
        [(apply, config["metric"], bn or config.get("bn", "transductive"))
         for config, apply in members], n_way, jit_compile=jit_compile, **(adapt or {}))

    def evaluate_ensemble(states, batch):
        accuracy, _, each = step([state["weights"] for state in states], batch)
        each = np.asarray(each, np.float64)
        return {"accuracy": np.asarray(accuracy, np.float64),
                **{f"member_{i}": each[:, i] for i in range(each.shape[1])}}
    return evaluate_ensemble


def sequence_views(adapt):
    """The test-time views (``adaptation.VIEWS``) a MANN/LSTM is scored under, from fm-eval's
    ``adapt`` options (None: 1, the images alone); ``ValueError`` for the options that need a
    support set (fine-tuning, views of the queries, refinement by the queries)."""
    if not adapt:
        return 1
    others = [name for name, key in (("--finetune_steps", "steps"),
                                     ("--tta_queries", "query_views"),
                                     ("--transductive_steps", "transductive_steps"))
              if adapt.get(key)]
    if others:
        raise ValueError(f"{', '.join(others)} need a support set; a MANN/LSTM sequence has "
                         "none (--tta applies: every image of a sequence under each view)")
    from functional_meta import adaptation
    adaptation.check_views(adapt.get("views", 1))
    return adapt.get("views", 1)


def _view_probabilities(eval_step, weights, batch, views):
    """Each step's class probabilities ``[B, T, C]`` (float64), averaged over the sequences run
    again with every image under each of the first ``views`` of ``adaptation.VIEWS`` (the
    same view throughout a sequence, so the model sees a consistent sequence)."""
    if views == 1:
        return np.asarray(eval_step(weights, batch)[2], np.float64)
    from functional_meta import adaptation
    images = tf.convert_to_tensor(batch[0])
    b, t, h, w, c = images.shape
    viewed = tf.reshape(adaptation.augment(images, adaptation.view_matrices(views, h, w)),
                        [b, views, t, h, w, c])                      # view after view
    return sum(np.asarray(eval_step(weights, (viewed[:, v], *batch[1:]))[2], np.float64)
               for v in range(views)) / views


def make_sequence_ensemble_evaluator(members, *, jit_compile=None, views=1):
    """``evaluator(states, batch)``: the per-sequence values of an ensemble of MANN/LSTM
    checkpoints (``accuracy``, ``instance_<k>``), each step's class the one of highest mean
    probability over the members (and over ``views``, as ``_view_probabilities``), and each
    member's own as ``member_<i>_<value>``, from the same pass. ``members`` holds ``(config,
    apply)`` pairs of one way (their outputs' classes) and ``states`` their states in the same
    order."""
    for config, _ in members:
        if not is_sequence(config):
            raise ValueError(f"a sequence ensemble is of MANN/LSTM checkpoints; one is "
                             f"{config['algorithm']}")
        if config["n_way"] != members[0][0]["n_way"]:
            raise ValueError(f"the members' outputs have {members[0][0]['n_way']} and "
                             f"{config['n_way']} classes")
    steps = [mann.make_eval_step(
        apply, jit_compile=default_jit(config["algorithm"]) if jit_compile is None
        else jit_compile) for config, apply in members]
    n_way = members[0][0]["n_way"]

    def evaluate_sequence_ensemble(states, batch):
        outputs = [_view_probabilities(step, state["weights"], batch, views)
                   for step, state in zip(steps, states)]
        values = _sequence_values(np.mean(outputs, axis=0).argmax(-1), batch[2], n_way)
        for i, probabilities in enumerate(outputs):
            values.update({f"member_{i}_{key}": value for key, value
                           in _sequence_values(probabilities.argmax(-1), batch[2], n_way).items()})
        return values
    return evaluate_sequence_ensemble


def _sequence_evaluator(config, apply, n_way, jit_compile, views=1):
    """The MANN/LSTM evaluator: per episode ``accuracy`` over all steps, ``loss``, and
    ``instance_<k>``, the accuracy at the ``k``-th instance of the episode's classes. With
    ``views`` > 1 each step's class is the one of highest probability averaged over the views
    (``_view_probabilities``), and the loss that mean's cross-entropy."""
    if n_way not in (None, config["n_way"]):
        raise ValueError(f"n_way={n_way}, but this {config['algorithm']} network's output has "
                         f"{config['n_way']} classes: evaluate it with {config['n_way']} classes")
    eval_step = mann.make_eval_step(apply, jit_compile=jit_compile)

    def evaluate_sequences(state, batch):
        if views == 1:
            predictions, losses, _ = eval_step(state["weights"], batch)
            losses = np.asarray(losses, np.float64)
        else:
            probabilities = _view_probabilities(eval_step, state["weights"], batch, views)
            predictions = probabilities.argmax(-1)
            true = np.take_along_axis(probabilities, np.asarray(batch[2])[..., None], -1)[..., 0]
            losses = -np.log(np.maximum(true, np.finfo(np.float32).tiny)).mean(axis=1)
        return dict(_sequence_values(predictions, batch[2], config["n_way"]), loss=losses)
    return evaluate_sequences


def sequence_baseline_evaluator(config, mode):
    """The evaluator of ``sequences.online_baseline(mode)`` on what the MANN/LSTM of ``config``
    reads of each image (its encoder's features and/or the pixels, from the state's weights):
    per episode ``accuracy`` and ``instance_<k>``, as the network's own evaluator."""
    if not is_sequence(config):
        raise ValueError(f"{config['algorithm']} is not a sequence model (mann, lstm)")

    def evaluate_baseline(state, batch):
        inputs = mann.image_inputs(state["weights"], batch[0], config["encoder_channels"],
                                   config["pixels"])
        predictions = sequences_lib.online_baseline(inputs, batch[2], mode)
        return _sequence_values(predictions, batch[2], config["n_way"])
    return evaluate_baseline


def _sequence_values(predictions, labels, n_way):
    """Per episode ``accuracy`` over all steps and ``instance_<k>`` (``k = 1 ...``)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    by_instance = sequences_lib.accuracy_by_instance(predictions, labels, labels.shape[1] // n_way)
    values = {"accuracy": (predictions == labels).mean(axis=1)}
    values.update({f"instance_{k + 1}": by_instance[:, k] for k in range(by_instance.shape[1])})
    return values


def episode_values(evaluator, state, sampler, num_episodes):
    """``evaluator``'s per-episode values over the sampler's batches ``0, 1, ...`` until
    ``num_episodes`` episodes (the last batch cut): a dict of arrays ``[num_episodes]``."""
    if isinstance(num_episodes, bool) or not isinstance(num_episodes, int) or num_episodes < 1:
        raise ValueError(f"num_episodes must be a positive integer, got {num_episodes!r}")
    num_batches = -(-num_episodes // sampler.meta_batch)
    values = {}
    start = last = time.perf_counter()
    for i, batch in enumerate(episodes.dataset(sampler, start_batch=0, num_batches=num_batches)):
        for name, v in evaluator(state, batch).items():
            values.setdefault(name, []).append(v)
        done, now = min((i + 1) * sampler.meta_batch, num_episodes), time.perf_counter()
        if done < num_episodes and now - last >= EVAL_PROGRESS_SECONDS:
            logging.info("scored %d/%d episodes in %.0f s (about %.0f s left)", done,
                         num_episodes, now - start, (now - start) * (num_episodes - done) / done)
            last = now
    return {name: np.concatenate(v)[:num_episodes] for name, v in values.items()}


def summarize(values):
    """``{name: [per-episode values]}`` -> ``{name: mean, name + '_ci95': half-width}``."""
    out = {}
    for name, v in values.items():
        mean, ci = metrics.mean_confidence_interval(v)
        out[name], out[name + "_ci95"] = mean, ci
    return out


def evaluate(evaluator, state, sampler, num_episodes):
    """Mean and 95% confidence half-width of every per-episode value (see ``summarize``)."""
    return summarize(episode_values(evaluator, state, sampler, num_episodes))


def pixel_baseline(batch, mode="nn"):
    """Per-episode accuracy of classifying queries in raw pixel space: ``mode='nn'``, the label of
    the nearest support image (1-NN, Euclidean); ``'class_mean'``, the nearest class-mean image."""
    support_x, support_y, query_x, query_y = (np.asarray(a) for a in batch)
    b = support_x.shape[0]
    s = support_x.reshape(b, support_x.shape[1], -1).astype(np.float64)
    q = query_x.reshape(b, query_x.shape[1], -1).astype(np.float64)
    if mode == "class_mean":
        n_way = int(support_y.max()) + 1
        one_hot = (support_y[..., None] == np.arange(n_way)).astype(np.float64)  # [B, S, N]
        s = np.einsum("bsn,bsd->bnd", one_hot, s) / one_hot.sum(1)[..., None]
        labels = np.broadcast_to(np.arange(n_way), (b, n_way))
    elif mode == "nn":
        labels = support_y
    else:
        raise ValueError(f"mode must be 'nn' or 'class_mean', got {mode!r}")
    d = (q ** 2).sum(-1)[:, :, None] - 2 * q @ s.transpose(0, 2, 1) + (s ** 2).sum(-1)[:, None, :]
    predicted = np.take_along_axis(labels, d.argmin(-1), axis=1)
    return (predicted == query_y).mean(axis=1)


def pixel_evaluator(mode):
    """``pixel_baseline`` with the evaluator signature (the state is ignored)."""
    return lambda state, batch: {"accuracy": pixel_baseline(batch, mode)}


# ----------------------------------------------------------------------------------------------
# The training loop


@dataclasses.dataclass
class TrainResult:
    """What ``train`` did: the final ``step``, the per-step ``losses`` of this call (in order),
    the best validation record (``best``) and the last checkpoint written."""
    step: int
    losses: list
    best: Optional[dict]
    checkpoint: Optional[str]


def format_progress(record):
    """One progress line from a ``train`` log record."""
    parts = [f"step {record['step']}/{record['steps']}", f"loss {record['loss']:.4f}"]
    if "accuracy" in record:
        parts.append(f"acc {record['accuracy']:.3f}")
    parts.append(f"{record['episodes_per_sec']:.1f} episodes/s")
    parts.append(f"ETA {_duration(record['eta_sec'])}")
    return "  ".join(parts)


def _duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _log_progress(record):
    if record.get("split") == "val":
        text = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("split", "step"))
        logging.info("validation at step %d: %s", record["step"], text)
    else:
        logging.info(format_progress(record))


def _score(result):
    """Higher is better: validation accuracy, else minus the MSE/loss."""
    if "accuracy" in result:
        return result["accuracy"]
    return -result["mse"] if "mse" in result else -result["loss"]


def _trim_history(path, last_step):
    """Drops history records after ``last_step`` (written after the checkpoint a resume starts from)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= last_step]
    configs.atomic_write(path, "".join(line + "\n" for line in kept))


def _trim_events(folder, last_step):
    """Drops the TensorBoard summaries after ``last_step`` from the events files in ``folder``, so
    that a resumed run's values are the only ones past its checkpoint (TensorBoard would otherwise
    show two values per step). A file is rewritten (a temporary file renamed over it) only when it
    loses something; a record torn by a killed process is dropped too."""
    for path in sorted(Path(folder).glob("events.out.tfevents.*")) if Path(folder).is_dir() else []:
        kept, dropped = [], 0
        try:
            for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
                event = event_pb2.Event.FromString(raw)
                if event.HasField("summary") and event.step > last_step:
                    dropped += 1
                else:
                    kept.append(raw)
        except tf.errors.DataLossError:
            dropped += 1
        if not dropped:
            continue
        if not any(event_pb2.Event.FromString(raw).HasField("summary") for raw in kept):
            path.unlink()
            continue
        temporary = path.with_name("trimming-" + path.name.replace("tfevents", "events"))
        with tf.io.TFRecordWriter(str(temporary)) as writer:
            for raw in kept:
                writer.write(raw)
        temporary.replace(path)


def _best_record(history, info):
    """The best validation so far (``info['best_step']``) as ``{'step', ...}`` with its record's
    values from ``history``, or ``None`` if no validation ran."""
    if info["best_step"] < 0:
        return None
    records = [json.loads(line) for line in history.read_text().splitlines() if line.strip()] \
        if history.exists() else []
    for record in records:
        if record.get("split") == "val" and record["step"] == info["best_step"]:
            return {k: v for k, v in record.items() if k != "split"}
    return {"step": info["best_step"], "score": info["best_score"]}


def _metadata(plugin):
    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = plugin
    return metadata


# Summaries are written with the core op ``tf.summary.write`` in TensorBoard's scalar/image
# formats, so training needs no ``tensorboard`` package (``tf.summary.scalar`` does).
def _scalar_summary(tag, value, step):
    tf.summary.write(tag, tf.constant(value, tf.float32), step=step, metadata=_metadata("scalars"))


def _image_summary(tag, images, step):
    """``images [n, H, W, C]`` floats in [0, 1] as one TensorBoard image summary."""
    images = tf.convert_to_tensor(images)
    pngs = tf.map_fn(lambda x: tf.image.encode_png(tf.image.convert_image_dtype(x, tf.uint8)),
                     images, fn_output_signature=tf.string)
    size = [tf.as_string(images.shape[2]), tf.as_string(images.shape[1])]   # width, height
    tf.summary.write(tag, tf.concat([tf.stack(size), pngs], 0), step=step,
                     metadata=_metadata("images"))


def _episode_summary(batch, step):
    """The first episode's support and query sets (a sequence's images) as TensorBoard images."""
    if len(batch) == 3:                                      # sequences.SequenceSampler
        _image_summary("episode/sequence", batch[0][0], step)
        return
    if len(batch) == 2 and np.ndim(batch[0]) < 3:            # envs.TaskSampler: no images
        return
    if len(batch) == 2:                                      # domains.DomainBatchSampler
        _image_summary("batch/first_domain", batch[0][0], step)
        return
    support_x, _, query_x, _ = batch
    if np.ndim(support_x) == 5:
        _image_summary("episode/support", support_x[0], step)
        _image_summary("episode/query", query_x[0], step)


def divergence_threshold(config):
    """The mean training loss above which a classification run counts as diverging:
    ``10 log(n_way) + 10``, or ``None`` for regression and RL (an MSE or a return has no chance
    level).

    A model that guesses uniformly has the loss ``log(n_way)`` (runs start near it); a mean loss
    above the threshold means the right class gets, on average, a probability below
    ``n_way**-10 * e**-10``: the model is confidently wrong, as after an outer rate so large that
    the weights blew up (a loss of 1e8 to 1e11 at ``outer_lr=1e6``), never while it learns.
    """
    if config.get("loss") == "mse" or config["algorithm"] in configs.RL_ALGORITHMS:
        return None
    return 10 * math.log(config["n_way"]) + 10


# Consecutive progress windows above ``divergence_threshold`` that stop a run.
DIVERGED_WINDOWS = 3


def train(learner, sampler, *, out_dir, steps, seed=0, log_every=100, checkpoint_every=500, keep=5,
          validate=None, val_every=0, resume=False, summaries=True, on_progress=None,
          restore_from=None):
    """Meta-trains ``learner`` on ``sampler``'s batches for ``steps`` steps in total.

    ``out_dir`` receives ``config.json`` (``learner.config``), ``history.jsonl`` (one JSON record per
    progress line and validation), TensorBoard summaries (``train/``, ``val/``), the latest ``keep``
    checkpoints (every ``checkpoint_every`` steps and at the end) and the best one.

    ``validate(state) -> {'accuracy'|'mse'|'loss': mean, ...}`` runs every ``val_every`` steps; the
    best checkpoint has the highest accuracy (lowest MSE for regression). ``on_progress(record)``
    gets every record (default: an ``absl.logging.info`` line with step, loss, accuracy,
    episodes/s and ETA every ``log_every`` steps).

    ``resume=True`` continues from the newest readable checkpoint with the same weights, optimiser
    state, inner rates, batch index and open progress window, so (with op determinism on) the
    losses, ``history.jsonl`` and the TensorBoard scalars equal those of an uninterrupted run:
    records and events an interrupted attempt wrote after that checkpoint are dropped. Resuming
    a folder without checkpoints is an error; without ``resume`` a folder that already holds
    checkpoints is refused.

    A non-finite loss raises ``checkpoints.NonFiniteError`` naming the step before anything of
    that step is saved. A classification loss whose window mean stays above
    ``divergence_threshold`` for ``DIVERGED_WINDOWS`` progress lines raises
    ``checkpoints.DivergedError``; while the loss is above it no checkpoint (but the final one)
    and no best checkpoint is saved, so the last good checkpoint the error names, and the best
    one, precede the divergence.

    ``restore_from``: the run folder whose checkpoints ``resume`` reads (default ``out_dir``). A
    non-chief worker of a multi-worker run writes into a temporary ``out_dir`` and restores from
    the chief's folder (``distribute.checkpoint_directory``).
    """
    configs.check_positive_int({"steps": steps, "log_every": log_every,
                                "checkpoint_every": checkpoint_every},
                               "steps", "log_every", "checkpoint_every")
    if val_every and validate is None:
        raise ValueError("val_every > 0 needs a validate function")
    on_progress = on_progress or _log_progress
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = learner.init(seed)
    store = checkpoints.Checkpoints(out, state, keep=keep)
    history = out / HISTORY_FILE
    info = {"step": 0, "data_seed": sampler.seed, "next_batch": 0, "best_score": -np.inf,
            "best_step": -1, "log_state": ""}
    config_file = out / configs.CONFIG_FILE
    stored = configs.read_config(config_file) if config_file.exists() else None
    source = store if restore_from is None else checkpoints.Checkpoints(Path(restore_from), state,
                                                                        keep=keep)
    if source.candidates():
        if not resume:
            raise ValueError(f"{out} already holds checkpoints; resume (--resume) or choose "
                             "another out_dir")
        if stored is not None:
            configs.check_same_config(stored, learner.config)
        found = source.restore()
        if found is None:
            raise ValueError(f"no readable checkpoint in {source.directory}")
        state, info, path = found
        if info["data_seed"] != sampler.seed:
            raise ValueError(f"cannot resume: the checkpoint's data seed is {info['data_seed']}, "
                             f"the sampler's {sampler.seed} (--seed)")
        logging.info("resuming from %s at step %d", path, info["step"])
        last_path = path
    elif resume:
        raise ValueError(f"cannot resume: {source.directory} holds no checkpoint "
                         f"({source.directory / 'checkpoints'} is missing or empty); to start a "
                         "new run there, leave out resume (--resume)")
    else:
        last_path = None
    for partial in store.remove_partial():
        logging.info("removed %s, left by a save that was interrupted", partial)
    # What an interrupted attempt wrote after the checkpoint goes; from step 0 (an attempt that
    # never checkpointed) everything, the first episode's images included: they are written again.
    _trim_history(history, info["step"])
    for name in ("train", "val"):
        _trim_events(out / name, info["step"] if info["step"] else -1)
    configs.save_config(out, dict(learner.config, steps=steps))
    start = info["step"]
    losses = []
    best = None
    if start >= steps:
        logging.info("already trained %d of %d steps", start, steps)
        return TrainResult(start, losses, _best_record(history, info), last_path)

    writers = {}
    if summaries:
        writers = {name: tf.summary.create_file_writer(str(out / name)) for name in ("train", "val")}
        if start == 0:
            with writers["train"].as_default():
                _episode_summary(sampler.batch(0), 0)
            writers["train"].flush()
    meta_batch = sampler.meta_batch
    # The open progress window (per-step values since the last progress line) and the number of
    # consecutive diverging windows, restored from the checkpoint so a resumed run logs the same.
    log_state = json.loads(info["log_state"]) if info["log_state"] else {}
    window = {"loss": log_state.get("loss", []), "accuracy": log_state.get("accuracy", [])}
    diverging = log_state.get("diverging", 0)
    threshold = divergence_threshold(learner.config)
    window_start = time.perf_counter()
    window_first_step = start

    def emit(record, writer):
        with history.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if writer is not None:
            with writer.as_default():
                for key, value in record.items():
                    if key not in ("step", "steps", "split", "eta_sec"):
                        _scalar_summary(key, value, record["step"])
            writer.flush()          # on disk with the history record, whatever happens next
        on_progress(record)

    def suspect():
        """Whether the loss is above the divergence threshold now (nothing is saved then)."""
        return threshold is not None and (
            diverging > 0 or bool(window["loss"]) and float(np.mean(window["loss"])) > threshold)

    step = start
    batches = episodes.dataset(sampler, start_batch=info["next_batch"], num_batches=steps - start)
    for batch in batches:
        new_state, step_metrics = learner.step(state, batch)
        loss = float(step_metrics["loss"])
        if not math.isfinite(loss):
            where = f"; the last good checkpoint is {last_path}" if last_path else ""
            raise checkpoints.NonFiniteError(f"non-finite loss {loss} at step {step + 1}: training "
                                             f"stopped, nothing of this step saved{where}",
                                             step=step + 1)
        state, step = new_state, step + 1
        info = dict(info, step=step, next_batch=info["next_batch"] + 1)
        losses.append(loss)
        window["loss"].append(loss)
        if "accuracy" in step_metrics:
            window["accuracy"].append(float(step_metrics["accuracy"]))
        if step % log_every == 0 or step == steps:
            now = time.perf_counter()
            per_step = (now - window_start) / max(step - window_first_step, 1)
            record = {"step": step, "steps": steps, "loss": float(np.mean(window["loss"]))}
            if window["accuracy"]:
                record["accuracy"] = float(np.mean(window["accuracy"]))
            record.update(episodes_per_sec=meta_batch / per_step, eta_sec=per_step * (steps - step))
            emit(record, writers.get("train"))
            window = {"loss": [], "accuracy": []}
            window_start, window_first_step = time.perf_counter(), step
            if threshold is not None and record["loss"] > threshold:
                diverging += 1
                if diverging >= DIVERGED_WINDOWS:
                    where = (f"the last good checkpoint is {last_path}" if last_path else
                             "no checkpoint was saved before it")
                    raise checkpoints.DivergedError(
                        f"the loss diverged: its mean over each of the last {diverging} progress "
                        f"windows (to step {step}) was above {threshold:.1f} = 10 log(n_way) + 10 "
                        f"(chance level: log({learner.config['n_way']}) = "
                        f"{math.log(learner.config['n_way']):.2f}), the last {record['loss']:.4g};"
                        f" training stopped, nothing saved since the loss rose, {where}; try a "
                        "smaller outer learning rate", step=step)
                logging.warning("mean loss %.4g above %.1f (10 log(n_way) + 10) at step %d: no "
                                "checkpoint is saved until it comes down; %d such windows in a "
                                "row stop the run", record["loss"], threshold, step,
                                DIVERGED_WINDOWS)
            else:
                diverging = 0
        if val_every and (step % val_every == 0 or step == steps):
            result = validate(state)
            emit({"split": "val", "step": step, **result}, writers.get("val"))
            if _score(result) > info["best_score"] and not suspect():
                info = dict(info, best_score=_score(result), best_step=step)
                store.save(state, info, best=True)
                best = {"step": step, **result}
        if step == steps or step % checkpoint_every == 0 and not suspect():
            info = dict(info, log_state=json.dumps(dict(window, diverging=diverging)))
            last_path = store.save(state, info)
    for writer in writers.values():
        writer.flush()
    if best is None:
        best = _best_record(history, info)
    return TrainResult(step, losses, best, last_path)


# ----------------------------------------------------------------------------------------------
# Data for the figures


def sinusoid_curves(learner, state, steps=(1, 10), k_shot=10, seed=0, points=200):
    """The MAML paper's sinusoid figure for one task: ``{'x', 'truth', 'support_x', 'support_y',
    'pre-update', '<n> steps'...}`` as numpy, adapting with plain SGD at the state's inner rate."""
    tasks = data_lib.sinusoid_tasks(1, k_shot, 1, seed)
    x = np.linspace(-5, 5, points, dtype=np.float32)[None, :, None]
    curves = {"x": x[0, :, 0], "truth": tasks.amplitude[0] * np.sin(x[0, :, 0] - tasks.phase[0]),
              "support_x": tasks.support_x[0, :, 0], "support_y": tasks.support_y[0, :, 0]}
    weights = state["weights"]
    curves["pre-update"] = np.asarray(learner.apply(weights, x))[0, :, 0]
    for n in steps:
        adapted = maml.adapt(learner.apply, weights, tasks.support_x, tasks.support_y,
                             state["inner_lr"], n, loss="mse", first_order=True)
        curves[f"{n} step{'s' if n > 1 else ''}"] = np.asarray(learner.apply(adapted, x))[0, :, 0]
    return curves


def embed_classes(learner, state, classes, num_classes=5, per_class=20, seed=0):
    """ProtoNet embeddings ``[n, D]`` and class names ``[n]`` of ``per_class`` images from each of
    ``num_classes`` classes of ``classes`` (chosen with ``seed``), for the embedding figure (whose
    legend names the classes)."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(classes), min(num_classes, len(classes)), replace=False)
    images, labels = [], []
    for c in chosen:
        x = classes.images[c]
        images.append(x[rng.choice(len(x), min(per_class, len(x)), replace=False)])
        labels += [classes.names[c]] * len(images[-1])
    x = np.concatenate(images).astype(np.float32)[None] / 255.0
    return np.asarray(learner.apply(state["weights"], x))[0], np.array(labels)
