"""The absl binaries (fm-maml-bench, fm-protonet-bench, fm-sweep, fm-train, fm-eval, fm-maml-study).

Process-wide settings are made here, before TensorFlow is imported (hence in the package every
binary's module belongs to), each unless the caller chose already (BUILD.md):

- ``TF_ENABLE_ONEDNN_OPTS=1``: TensorFlow leaves its oneDNN kernels off on some x86 CPUs (AMD
  EPYC among them), and ProtoNet's convolutions run much faster with them (docs/design.md,
  oneDNN kernels on).
- ``--xla_cpu_multi_thread_eigen=false`` in ``XLA_FLAGS``: XLA then runs each matrix product of a
  compiled step on one thread. MAML's products, in chunks of 8 tasks, are too small to split
  well (docs/design.md, XLA's products on one thread).
- ``TF_CPP_MIN_LOG_LEVEL=2``: TensorFlow's C++ code logs errors only, not its start-up and
  compilation notes. Errors stay (2, not 3), so an out-of-memory or a failing kernel is still
  reported. A user who sets the variable (``TF_CPP_MIN_LOG_LEVEL=0 fm-train ...``) sees
  everything; ``--verbosity`` governs the binaries' own (Python) log lines as before.

The binaries import TensorFlow only after their flags are parsed and checked, through
``start_tensorflow``, so that ``--help`` and a mistyped flag answer at once.
"""

import os
import re
import sys
import tempfile

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
EIGEN_THREADS_FLAG = "--xla_cpu_multi_thread_eigen"
if EIGEN_THREADS_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {EIGEN_THREADS_FLAG}=false".strip()
QUIET_START = "TF_CPP_MIN_LOG_LEVEL" not in os.environ
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Lines TensorFlow's C++ start-up writes to stderr whatever TF_CPP_MIN_LOG_LEVEL says: they are
# logged while its libraries load, before it reads the variable.
_STARTUP_NOISE = re.compile(r"All log messages before absl::InitializeLog\(\) is called"
                            r"|port\.cc:\d+\] oneDNN custom operations are on"
                            r"|cudart_stub\.cc:\d+\] Could not find cuda drivers")
# Logged as an error when the CUDA driver cannot start. Without an NVIDIA driver on the machine
# it only says that there is no GPU (the binaries report the device they use); with one, it is a
# real fault and is kept.
_NO_DRIVER_NOISE = re.compile(r"failed call to cuInit")
NVIDIA_DRIVER = "/proc/driver/nvidia/version"


def start_tensorflow():
    """Imports TensorFlow and lists its devices, leaving out the start-up lines above (unless the
    user set ``TF_CPP_MIN_LOG_LEVEL``); every other line written meanwhile is passed on.
    Returns the ``tensorflow`` module."""
    if not QUIET_START or "tensorflow" in sys.modules:
        import tensorflow as tf
        return tf
    noise = [_STARTUP_NOISE] + ([] if os.path.exists(NVIDIA_DRIVER) else [_NO_DRIVER_NOISE])
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf
            tf.config.list_physical_devices("GPU")    # where the CUDA driver is tried
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not any(pattern.search(line) for pattern in noise):
                    sys.stderr.write(line)
            sys.stderr.flush()
    return tf
