"""The names of the data sources, ProtoNet distances and distribution strategies, without
TensorFlow.

They belong to ``data``, ``protonet`` and ``distribute`` (which name them ``SOURCES``,
``METRICS``, ``STRATEGIES``), but are written here so that ``configs`` and the binaries' flags can
offer and check them before TensorFlow is imported: ``--help`` and a mistyped flag then answer
at once instead of after TensorFlow's seconds of start-up.
"""

# Image sources of ``data.load``.
IMAGE_SOURCES = ("synthetic", "omniglot", "omniglot_tfds", "mnist", "mnist_tfds", "folder")
# ``protonet``'s distances to the prototypes.
METRICS = ("euclidean", "cosine")
# Batch-norm statistics of conv4's queries: the whole episode's, or the support set's alone
# (``nets.conv4``'s ``bn_rows``; strictly inductive scoring).
BN_MODES = ("transductive", "support")
# ``distribute.make_strategy``'s strategies.
STRATEGIES = ("none", "mirrored", "multiworker")
