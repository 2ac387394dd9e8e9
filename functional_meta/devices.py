"""Which device a compiled step is traced for, and every choice that depends on it, in one place.

The step's fastest form differs between a CPU and a GPU: convolutions of per-task weights as
patches (im2col) times the kernels on a CPU, as one grouped convolution on a GPU; the wide kernel
gradients behind an optimisation barrier on a CPU only; task chunks sized for a CPU's caches; XLA
for ProtoNet and the recurrent networks on a GPU only. ``CHOICES`` holds them for each kind of
device and docs/design.md's table of device choices says why and what was measured where.

``kind()`` is the target of the current trace: the ``target(kind)`` block it runs in, else
``'gpu'`` when TensorFlow sees a GPU and the trace is not placed on the CPU, else ``'cpu'``. The
choices are read when a step is traced, so a step traced under ``target('gpu')`` on a CPU host is
the GPU graph (an HLO export for a GPU, or a test of that graph's values and derivatives on the
CPU). A ``tf.function`` keeps the graph of its first trace: build the step inside the block.

``precision(name)`` chooses the inputs of the network's matrix products and convolutions:
``'float32'`` (the default on both) or ``'bfloat16'`` (float32 weights and activations rounded to
bfloat16 at the inputs of the products, which accumulate in float32; each result is rounded to
bfloat16 and cast back to float32, so batch-norm statistics, losses and the optimiser stay
float32). float64 networks are never rounded: the exactness checks keep their precision whatever
the setting.

This module imports TensorFlow only when a function needs it, so that the binaries' flags can
offer and check ``KINDS`` and ``PRECISIONS`` before TensorFlow loads.
"""

import contextlib
import contextvars
from typing import NamedTuple

KINDS = ("cpu", "gpu")
PRECISIONS = ("float32", "bfloat16")


class Choices(NamedTuple):
    """The device-dependent choices of a compiled step (docs/design.md, device choices)."""
    patches: bool           # per-task convolutions as im2col products, else grouped convolutions
    kernel_barrier: bool    # kernel gradients in the wide form behind a barrier (under XLA)
    task_chunks: bool       # MAML's default task chunk sized for the caches, else the whole batch
    xla_everywhere: bool    # XLA by default also for ProtoNet, MANN and LSTM (MAML: always)


CHOICES = {
    "cpu": Choices(patches=True, kernel_barrier=True, task_chunks=True, xla_everywhere=False),
    "gpu": Choices(patches=False, kernel_barrier=False, task_chunks=False, xla_everywhere=True),
}

_target = contextvars.ContextVar("functional_meta_devices_target", default=None)
_precision = contextvars.ContextVar("functional_meta_devices_precision", default="float32")
_changes = contextvars.ContextVar("functional_meta_devices_changes", default={})


def check_kind(name):
    """``name`` if it is one of ``KINDS``, else a ``ValueError`` naming the allowed kinds."""
    if name not in KINDS:
        raise ValueError(f"device kind must be one of {list(KINDS)}, got {name!r}")
    return name


def check_precision(name):
    """``name`` if it is one of ``PRECISIONS``, else a ``ValueError`` naming them."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {name!r}")
    return name


@contextlib.contextmanager
def _setting(variable, value):
    """``variable`` set to ``value`` inside the block (and its previous value restored after)."""
    token = variable.set(value)
    try:
        yield value
    finally:
        variable.reset(token)


def target(name):
    """Trace steps for device kind ``name`` (``'cpu'`` or ``'gpu'``) inside this block, whatever
    the machine: ``with devices.target('gpu'): step = maml.make_train_step(...); step(...)``."""
    return _setting(_target, check_kind(name))


def precision(name):
    """Products' input precision (``PRECISIONS``) for the steps traced inside this block."""
    return _setting(_precision, check_precision(name))


def changed(**choices):
    """The target's ``Choices`` with some changed, for steps traced inside this block: to measure
    one choice against another (``with devices.changed(patches=False): ...``)."""
    unknown = sorted(set(choices) - set(Choices._fields))
    if unknown:
        raise ValueError(f"unknown device choices {unknown}; the choices are "
                         f"{list(Choices._fields)}")
    return _setting(_changes, {**_changes.get(), **choices})


def kind():
    """``'cpu'`` or ``'gpu'``: the device kind the current trace is for (module docstring)."""
    forced = _target.get()
    if forced is not None:
        return forced
    import tensorflow as tf
    from tensorflow.python.eager import context
    placed = (context.context().device_name or "").upper()   # an enclosing tf.device(...), if any
    if "CPU" in placed:
        return "cpu"
    return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"


def choices():
    """The ``Choices`` of the current target (``kind()``), with any ``changed`` block's changes."""
    return CHOICES[kind()]._replace(**_changes.get())


def compute_dtype(dtype):
    """The dtype the products of a ``dtype`` network take their inputs in: bfloat16 for float32
    under ``precision('bfloat16')``, else ``dtype`` itself (float64 is never rounded)."""
    import tensorflow as tf
    if _precision.get() == "bfloat16" and dtype == tf.float32:
        return tf.bfloat16
    return dtype


def default_jit(algorithm):
    """Whether ``algorithm``'s step compiles with XLA by default on the current target: MAML-style
    steps everywhere; ProtoNet, MANN and LSTM only where ``Choices.xla_everywhere`` (a GPU)."""
    if algorithm in ("protonet", "mann", "lstm"):
        return choices().xla_everywhere
    return True
