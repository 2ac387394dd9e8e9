"""The absl binaries (fm-maml-bench, fm-protonet-bench, fm-sweep, fm-train, fm-eval, fm-maml-study).

Two process-wide CPU settings are made here, before TensorFlow is imported (hence in the package
every binary's module belongs to), each unless the caller chose already (BUILD.md):

- ``TF_ENABLE_ONEDNN_OPTS=1``: TensorFlow leaves its oneDNN kernels off on some x86 CPUs (AMD
  EPYC among them), and ProtoNet's convolutions run much faster with them (docs/design.md,
  oneDNN kernels on).
- ``--xla_cpu_multi_thread_eigen=false`` in ``XLA_FLAGS``: XLA then runs each matrix product of a
  compiled step on one thread. MAML's products, in chunks of 8 tasks, are too small to split
  well (docs/design.md, XLA's products on one thread).
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
EIGEN_THREADS_FLAG = "--xla_cpu_multi_thread_eigen"
if EIGEN_THREADS_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {EIGEN_THREADS_FLAG}=false".strip()
