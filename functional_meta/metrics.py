"""Evaluation statistics shared by every algorithm, so MAML and ProtoNet are compared alike."""

import math

import numpy as np


def accuracy(logits, labels):
    """Fraction of correct argmax predictions; works on numpy arrays or tensors."""
    return float(np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(labels)))


def mean_confidence_interval(values, z=1.96):
    """Mean and 95% half-width ``z * std / sqrt(n)`` over episodes, as the MAML/ProtoNet papers
    report (std with ddof=1; the half-width is 0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("mean_confidence_interval needs at least one value")
    if values.size == 1:
        return float(values[0]), 0.0
    return float(values.mean()), float(z * values.std(ddof=1) / math.sqrt(values.size))
