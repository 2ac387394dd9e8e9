"""Checkpoints of a run folder, written atomically and restored exactly.

Checkpoints (``tf.train.CheckpointManager``) hold the state (weights, optimiser state, inner
learning rates), the step, the sampler's seed and next batch, and the best validation score so
far. A save writes the tensors to ``<prefix>_temp/``, merges them into ``<prefix>.index``/
``.data-*`` and only then rewrites the ``checkpoint`` state file, atomically (a temporary file
renamed over the old one). A process killed at any moment therefore leaves the state file naming
only complete checkpoints; ``Checkpoints.restore`` additionally falls back to the previous listed
checkpoint if the newest one cannot be read, so a damaged file never ends a run. The
``<prefix>_temp/`` folder a killed save leaves behind is removed by ``Checkpoints.remove_partial``
(``training.train`` calls it before it saves anything).
"""

import contextlib
import logging as python_logging
import os
import shutil
from pathlib import Path

import numpy as np
import tensorflow as tf
from absl import logging

from functional_meta import configs


# The numbers every checkpoint holds beside the state (see ``Checkpoints``).
INFO_FIELDS = ("step", "data_seed", "next_batch", "best_score", "best_step", "log_state")


class TrainingStopped(FloatingPointError):
    """Training stopped because the run went bad; ``step`` is the step (1-based) where it was
    noticed. Nothing of that step was saved."""

    def __init__(self, message, step):
        super().__init__(message)
        self.step = step


class NonFiniteError(TrainingStopped):
    """Training met a non-finite loss or state; ``step`` is the step (1-based) that produced it."""


class DivergedError(TrainingStopped):
    """The loss stayed finite but far above what a learning model gives (see
    ``training.divergence_threshold``); ``step`` is the step whose log window confirmed it."""


def all_finite(state):
    """True if every floating tensor of ``state`` is finite."""
    return all(bool(tf.reduce_all(tf.math.is_finite(t))) for t in tf.nest.flatten(state)
               if t.dtype.is_floating)


class Checkpoints:
    """Latest and best checkpoints of a run folder, for states shaped like ``template``.

    ``directory/checkpoints/ckpt-<step>`` (the latest ``keep``) and ``directory/best/ckpt-<step>``
    (the best by validation). Each holds the state, ``step``, the sampler's ``data_seed`` and
    ``next_batch``, the best validation score so far (``best_score``, higher is better, and
    ``best_step``) and ``log_state``, a JSON string of the training loop's open progress window
    (``training.train``), so that a resumed run logs what an uninterrupted one would. Checkpoints
    written before ``log_state`` existed restore with ``log_state=''``.
    """

    def __init__(self, directory, template, keep=5):
        self.directory = Path(directory)
        self.template = template
        self._vars = {key: [tf.Variable(t, trainable=False) for t in tf.nest.flatten(value)]
                      for key, value in template.items()}
        self._step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._data_seed = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._next_batch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._best_score = tf.Variable(-np.inf, dtype=tf.float64, trainable=False)
        self._best_step = tf.Variable(-1, dtype=tf.int64, trainable=False)
        self._log_state = tf.Variable("", dtype=tf.string, trainable=False)
        fields = dict(state=self._vars, step=self._step, data_seed=self._data_seed,
                      next_batch=self._next_batch, best_score=self._best_score,
                      best_step=self._best_step)
        self._legacy = tf.train.Checkpoint(**fields)          # reads checkpoints without log_state
        self._checkpoint = tf.train.Checkpoint(log_state=self._log_state, **fields)
        self.latest = tf.train.CheckpointManager(self._checkpoint, self.directory / "checkpoints",
                                                 max_to_keep=keep)
        self.best = tf.train.CheckpointManager(self._checkpoint, self.directory / "best",
                                               max_to_keep=1)

    def _assign(self, state, info):
        for key, variables in self._vars.items():
            for var, value in zip(variables, tf.nest.flatten(state[key])):
                var.assign(value)
        for name in INFO_FIELDS:
            getattr(self, "_" + name).assign(info.get(name, "") if name == "log_state"
                                             else info[name])

    def save(self, state, info, best=False):
        """Saves ``state`` and ``info`` (``INFO_FIELDS``; ``log_state`` may be left out) as the
        latest checkpoint, or as the best one; refuses a non-finite state."""
        if not all_finite(state):
            raise NonFiniteError(f"the state after step {info['step']} is not finite; "
                                 "not saved", step=info["step"])
        self._assign(state, info)
        manager = self.best if best else self.latest
        with _without_tensorflow_info():
            return manager.save(checkpoint_number=int(info["step"]))

    def candidates(self, which="latest"):
        """Listed checkpoint prefixes, newest first (only complete saves are ever listed)."""
        manager = self.best if which == "best" else self.latest
        return list(reversed(manager.checkpoints))

    def restore(self, path=None, which="latest"):
        """``(state, info, path)`` from ``path`` or, by default, the newest readable listed
        checkpoint (an unreadable one is skipped with a warning); ``None`` if there is none."""
        paths = [str(path)] if path else self.candidates(which)
        for candidate in paths:
            try:
                try:
                    self._read(self._checkpoint, candidate)
                except AssertionError:        # written before log_state existed
                    self._read(self._legacy, candidate)
                    self._log_state.assign("")
            except Exception as error:      # damaged files fail in many ways (OpError, IndexError..)
                if path:
                    raise ValueError(f"cannot read checkpoint {candidate}: {error}") from None
                logging.warning("skipping unreadable checkpoint %s: %s", candidate,
                                str(error).splitlines()[0])
                continue
            state = {key: tf.nest.pack_sequence_as(self.template[key],
                                                   [tf.identity(v) for v in self._vars[key]])
                     for key in self.template}
            info = {name: getattr(self, "_" + name).numpy() for name in INFO_FIELDS}
            info = {name: value.decode() if isinstance(value, bytes) else value.item()
                    for name, value in info.items()}
            return state, info, candidate
        return None

    @staticmethod
    def _read(checkpoint, path):
        status = checkpoint.restore(path)
        status.assert_existing_objects_matched()
        status.expect_partial()               # the save counter may stay unmatched; no warning

    def remove_partial(self):
        """Removes the ``<prefix>_temp/`` folders of saves that were killed before they finished
        (TensorFlow writes a checkpoint's tensors there, then merges them into ``<prefix>.*``);
        the paths removed. Only for the process that writes this folder, never during a save."""
        removed = []
        for folder in (self.directory / "checkpoints", self.directory / "best"):
            for temp in sorted(folder.glob("*_temp")) if folder.is_dir() else []:
                if temp.is_dir():
                    shutil.rmtree(temp, ignore_errors=True)
                    removed.append(temp)
        return removed


@contextlib.contextmanager
def _without_tensorflow_info():
    """Drops the INFO lines that TensorFlow's own code logs through absl meanwhile (each save
    logs "Sharding callback duration: ... microseconds"), unless absl's verbosity asks for debug
    output (``--verbosity=1``)."""
    if logging.get_verbosity() >= logging.DEBUG:
        yield
        return
    tensorflow_code = f"{os.sep}tensorflow{os.sep}"

    def keep(record):
        return record.levelno > python_logging.INFO or tensorflow_code not in record.pathname
    logger = logging.get_absl_logger()
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def has_checkpoints(out_dir):
    """Whether ``out_dir`` holds a run's latest checkpoints (``train`` refuses to start over them
    unless resuming)."""
    return tf.train.latest_checkpoint(str(Path(out_dir) / "checkpoints")) is not None


def restore_state(learner, path, which="best"):
    """The state stored in a run folder (``which`` = ``'best'``, falling back to ``'latest'`` when
    the run kept no best checkpoint) or at a checkpoint prefix ``path``; ``(state, info, path)``."""
    _, folder = configs.load_config(path)
    checkpoints = Checkpoints(folder, learner.init(0), keep=None)
    path = Path(path).resolve()
    explicit = path if path != folder and Path(f"{path}.index").exists() else None
    found = checkpoints.restore(explicit, which)
    if found is None and which == "best" and explicit is None:
        found = checkpoints.restore(None, "latest")
    if found is None:
        raise ValueError(f"no readable checkpoint in {folder}")
    return found
