"""The episode protocol of memory-augmented meta-learning (Santoro et al. 2016, Section 4): one
sequence of labelled images per episode, each label arriving one step late.

Per episode: ``n_classes`` distinct classes, labels ``0..n_classes-1`` assigned to them at random,
``n_instances`` distinct images of each, all ``n_classes * n_instances`` shown in one random order.
At step ``t`` the model sees image ``t`` and the label of step ``t - 1`` (none, encoded -1, at
step 0), and must predict label ``t``; the first instance of a class can only be guessed, later
ones can be recalled. Batch ``i`` is a pure function of ``(seed, i)`` as in
``episodes.EpisodeSampler``, so ``episodes.dataset`` and ``training.train`` serve it alike.
"""

import numpy as np
import tensorflow as tf

from functional_meta import episodes

# The accuracy columns the paper's Table 1 reports, by instance number (1-based).
REPORTED_INSTANCES = (1, 2, 3, 4, 5, 10)


class SequenceSampler(episodes.IndexedSampler):
    """Meta-batches of label-offset sequences from a ``ClassData``.

    ``batch(i)`` -> ``(images [B, T, H, W, C] float32 in [0, 1], previous_labels [B, T] int32,
    labels [B, T] int32)`` with ``T = n_classes * n_instances`` and ``previous_labels[:, 0] = -1``,
    ``previous_labels[:, t] = labels[:, t - 1]``. ``augment_shift``, ``augment_rotate``,
    ``augment_scale`` move, rotate and scale every image as ``episodes.EpisodeSampler`` does (the
    paper's small per-image translations and rotations; training samplers only).
    """

    def __init__(self, data, n_classes, n_instances, meta_batch=1, seed=0, augment_shift=0,
                 augment_rotate=0.0, augment_scale=0.0):
        episodes.check_positive(n_classes=n_classes, n_instances=n_instances,
                                 meta_batch=meta_batch)
        episodes.check_seed(seed)
        episodes.check_warp(augment_rotate, augment_scale)
        if isinstance(augment_shift, bool) or not isinstance(augment_shift, (int, np.integer)) \
                or augment_shift < 0:
            raise ValueError(f"augment_shift must be a non-negative integer, got {augment_shift!r}")
        if n_classes > len(data):
            raise ValueError(f"n_classes={n_classes} but the data has {len(data)} classes")
        sizes = np.array([len(x) for x in data.images])
        smallest = int(np.argmin(sizes))
        if n_instances > sizes[smallest]:
            raise ValueError(f"n_instances={n_instances} but the class {data.names[smallest]!r} "
                             f"has only {sizes[smallest]} images")
        shapes = {x.shape[1:] for x in data.images}
        if len(shapes) != 1:
            raise ValueError(f"all classes must have one image shape, got {sorted(shapes)}")
        self.n_classes, self.n_instances, self.meta_batch = n_classes, n_instances, meta_batch
        self.seed = int(seed)
        self.image_shape = shapes.pop()
        self.augment_shift = int(augment_shift)
        self.augment_rotate, self.augment_scale = float(augment_rotate), float(augment_scale)
        self._images = np.concatenate(data.images)
        self._sizes = sizes
        self._offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self._next = 0

    def _episode(self, rng):
        n, k = self.n_classes, self.n_instances
        classes = rng.choice(len(self._sizes), n, replace=False)           # label j <- classes[j]
        picks = np.stack([self._offsets[c] + rng.choice(self._sizes[c], k, replace=False)
                          for c in classes]).ravel()
        labels = np.repeat(np.arange(n, dtype=np.int32), k)
        order = rng.permutation(n * k)
        return picks[order], labels[order]

    def batch(self, index):
        """Batch number ``index``; does not change the state."""
        rng = np.random.default_rng([self.seed, int(index)])
        picks, labels = (np.stack(c) for c in zip(*[self._episode(rng)
                                                     for _ in range(self.meta_batch)]))
        images = self._images[picks]
        if self.augment_shift:
            images = episodes.shift_images(images, self.augment_shift, rng)
        if self.augment_rotate or self.augment_scale:
            images = episodes.warp_images(images, self.augment_rotate, self.augment_scale, rng)
        return images.astype(np.float32) / 255.0, previous_labels(labels), labels

    def signature(self):
        """``tf.TensorSpec``s of a batch, all dimensions static."""
        b, t = self.meta_batch, self.n_classes * self.n_instances
        return (tf.TensorSpec((b, t) + self.image_shape, tf.float32),
                tf.TensorSpec((b, t), tf.int32), tf.TensorSpec((b, t), tf.int32))


def previous_labels(labels):
    """``labels [B, T]`` shifted one step later: -1 at step 0, then ``labels[:, :-1]``."""
    labels = np.asarray(labels)
    return np.concatenate([np.full_like(labels[:, :1], -1), labels[:, :-1]], axis=1)


def instance_numbers(labels):
    """``[B, T]``: at each step, how many times its label has occurred so far, itself included
    (1 at a class's first instance)."""
    labels = np.asarray(labels)
    same = labels[:, :, None] == labels[:, None, :]                         # [B, T, T]
    return np.tril(same).sum(axis=2)


def accuracy_by_instance(predictions, labels, n_instances):
    """Per-episode accuracy at each instance number, ``[B, n_instances]``: column ``k - 1`` is
    the fraction of the episode's classes whose ``k``-th instance was predicted right."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    correct = (predictions == labels).astype(np.float64)
    numbers = instance_numbers(labels)
    columns = []
    for k in range(1, n_instances + 1):
        at_k = numbers == k
        columns.append((correct * at_k).sum(1) / np.maximum(at_k.sum(1), 1))
    return np.stack(columns, axis=1)


BASELINES = ("nn", "class_mean")


def online_baseline(inputs, labels, mode="class_mean"):
    """Predictions ``[B, T]`` of a classifier with no learnt part on the label-offset protocol:
    step ``t`` takes the label of the nearest of the earlier steps' ``inputs [B, T, D]``
    (``mode='nn'``, Euclidean) or of the nearest mean of each label's earlier inputs
    (``'class_mean'``); only labels of earlier steps are used. It reads how far an encoder's
    features (or the pixels) alone take a sequence, beside the controller that reads them. A
    class's first instance gets the nearest label seen so far (label 0 at step 0), so the 1st
    instance is nearly always wrong: this rule never guesses an unseen label."""
    if mode not in BASELINES:
        raise ValueError(f"mode must be one of {list(BASELINES)}, got {mode!r}")
    x = np.asarray(inputs, np.float64)
    labels = np.asarray(labels)
    t = x.shape[1]
    earlier = np.tril(np.ones([t, t], bool), -1)                            # [t, t']: t' < t
    if mode == "nn":
        squares = (x ** 2).sum(-1)                                          # [B, T, T] below
        d = squares[:, :, None] - 2 * x @ x.transpose(0, 2, 1) + squares[:, None, :]
        nearest = np.where(earlier, d, np.inf).argmin(-1)
        predictions = np.take_along_axis(labels, nearest, axis=1)
        return np.where(np.arange(t) == 0, 0, predictions).astype(labels.dtype)
    one_hot = (labels[..., None] == np.arange(labels.max() + 1)).astype(np.float64)  # [B, T, N]
    counts = np.einsum("st,btn->bsn", earlier, one_hot)                     # [B, T, N]
    sums = np.einsum("st,btn,btd->bsnd", earlier, one_hot, x)
    means = sums / np.maximum(counts, 1)[..., None]
    d = ((x[:, :, None, :] - means) ** 2).sum(-1)                           # [B, T, N]
    return np.where(counts > 0, d, np.inf).argmin(-1).astype(labels.dtype)
