"""The absl binaries (fm-maml-bench, fm-protonet-bench, fm-sweep, fm-train, fm-eval, fm-maml-study).

TensorFlow leaves its oneDNN kernels off on some x86 CPUs (this project's AMD EPYC machine among
them); with them on, a 60-way ProtoNet step ran 1.8x faster there (BUILD.md). The binaries turn them
on unless the caller set ``TF_ENABLE_ONEDNN_OPTS`` already. It must happen before TensorFlow is
imported, hence here, in the package every binary's module belongs to.
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
