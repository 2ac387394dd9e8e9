"""N-way K-shot episode sampling, and ``tf.data`` pipelines with static shapes for compiled steps.

Batch ``i`` of a sampler is a pure function of ``(seed, i)`` (its generator is
``numpy.random.default_rng([seed, i])``), so the sampler's whole state is the index of the next batch
and resuming is exact no matter how far a prefetching pipeline ran ahead.
"""

import numpy as np
import tensorflow as tf
from absl import logging

from functional_meta import data as data_lib


def check_positive(**values):
    """``ValueError`` naming the first value that is not a positive integer."""
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_seed(seed):
    """``ValueError`` unless ``seed`` is a non-negative integer."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


class IndexedSampler:
    """Batch ``i`` is ``self.batch(i)``, a pure function of ``(seed, i)``; the state is the seed and
    the index of the next batch."""

    def sample(self):
        """The next batch; advances the state by one."""
        self._next += 1
        return self.batch(self._next - 1)

    def get_state(self):
        """JSON-able state: the seed and the index of the next batch."""
        return {'seed': self.seed, 'next_batch': self._next}

    def set_state(self, state):
        if int(state['seed']) != self.seed:
            raise ValueError(f"state has seed={state['seed']} but the sampler has seed={self.seed}")
        self._next = int(state['next_batch'])


class EpisodeSampler(IndexedSampler):
    """Meta-batches of ``n_way``-way ``k_shot``-shot classification episodes from a ``ClassData``.

    Per episode: ``n_way`` distinct classes with labels 0..n_way-1 assigned at random; from each
    class ``k_shot + q_query`` distinct images, the first ``k_shot`` for the support set and the rest
    for the query set (so no image is in both); each set shuffled. ``sample()`` returns numpy
    ``(support_x [B, N*K, H, W, C] float32 in [0, 1], support_y [B, N*K] int32,
    query_x [B, N*Q, H, W, C] float32, query_y [B, N*Q] int32)``.

    ``augment_shift`` (training samplers only; default 0, none): every image of a batch is moved
    by its own random whole-pixel offset of at most this many pixels along each axis, uncovered
    pixels filled with 0 (the background of inverted Omniglot). The offsets come from the batch's
    generator after its episodes are drawn, so the episodes are the same with or without it and
    batch ``i`` stays a pure function of ``(seed, i)``. ``augment_rotate`` (degrees) and
    ``augment_scale`` (a fraction) then also rotate every image about its centre by an angle drawn
    from ``[-augment_rotate, augment_rotate]`` and scale it by a factor from
    ``[1 - augment_scale, 1 + augment_scale]`` (bilinear, zero fill; ``warp_images``).

    ``within_group=True`` draws all ``n_way`` classes of an episode from one group (an Omniglot
    alphabet, ``data.groups``), as in Lake et al.'s one-shot runs: first a group, uniformly among
    those with at least ``n_way`` classes, then the classes within it. Smaller groups are
    skipped (``skipped_groups`` names them, and the count is logged); none left is a
    ``ValueError`` naming ``n_way`` and the largest group.
    """

    def __init__(self, data, n_way, k_shot, q_query, meta_batch=1, seed=0, augment_shift=0,
                 augment_rotate=0.0, augment_scale=0.0, within_group=False):
        check_positive(n_way=n_way, k_shot=k_shot, q_query=q_query, meta_batch=meta_batch)
        check_seed(seed)
        if isinstance(augment_shift, bool) or not isinstance(augment_shift, (int, np.integer)) \
                or augment_shift < 0:
            raise ValueError(f"augment_shift must be a non-negative integer, got {augment_shift!r}")
        check_warp(augment_rotate, augment_scale)
        if n_way > len(data):
            raise ValueError(f"n_way={n_way} but the data has {len(data)} classes")
        sizes = np.array([len(x) for x in data.images])
        smallest = int(np.argmin(sizes))
        if k_shot + q_query > sizes[smallest]:
            raise ValueError(
                f"k_shot + q_query = {k_shot} + {q_query} = {k_shot + q_query} images per class "
                f"but the smallest class, {data.names[smallest]!r}, has {sizes[smallest]} images")
        shapes = {x.shape[1:] for x in data.images}
        if len(shapes) != 1:
            raise ValueError(f"all classes must have one image shape, got {sorted(shapes)}")
        self.n_way, self.k_shot, self.q_query, self.meta_batch = n_way, k_shot, q_query, meta_batch
        self.seed = int(seed)
        self.image_shape = shapes.pop()
        if augment_shift >= min(self.image_shape[:2]):
            raise ValueError(f"augment_shift={augment_shift} must be smaller than the images "
                             f"({self.image_shape[0]}x{self.image_shape[1]})")
        self.augment_shift = int(augment_shift)
        self.augment_rotate, self.augment_scale = float(augment_rotate), float(augment_scale)
        self._images = np.concatenate(data.images)          # all images, class after class
        self._sizes = sizes
        self._offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self._groups, self.skipped_groups = (_groups_of(data, n_way) if within_group
                                             else (None, []))
        self._next = 0

    def _episode(self, rng):
        """Indices into ``self._images`` and labels of one episode's support and query sets."""
        n, k, q = self.n_way, self.k_shot, self.q_query
        if self._groups is None:
            classes = rng.choice(len(self._sizes), n, replace=False)  # label j <- classes[j]
        else:
            members = self._groups[rng.integers(len(self._groups))]
            classes = rng.choice(members, n, replace=False)
        picks = np.stack([self._offsets[c] + rng.choice(self._sizes[c], k + q, replace=False)
                          for c in classes])                   # [N, K+Q]
        labels = np.broadcast_to(np.arange(n, dtype=np.int32)[:, None], (n, k + q))
        support = rng.permutation(n * k)
        query = rng.permutation(n * q)
        return (picks[:, :k].ravel()[support], labels[:, :k].ravel()[support],
                picks[:, k:].ravel()[query], labels[:, k:].ravel()[query])

    def _indices(self, rng):
        episodes = [self._episode(rng) for _ in range(self.meta_batch)]
        return tuple(np.stack(column) for column in zip(*episodes))

    def batch(self, index):
        """Batch number ``index`` as float images and int32 labels; does not change the state."""
        rng = np.random.default_rng([self.seed, int(index)])
        support_idx, support_y, query_idx, query_y = self._indices(rng)
        support_x, query_x = self._images[support_idx], self._images[query_idx]
        if self.augment_shift:
            support_x = shift_images(support_x, self.augment_shift, rng)
            query_x = shift_images(query_x, self.augment_shift, rng)
        if self.augment_rotate or self.augment_scale:
            support_x = warp_images(support_x, self.augment_rotate, self.augment_scale, rng)
            query_x = warp_images(query_x, self.augment_rotate, self.augment_scale, rng)
        return (support_x.astype(np.float32) / 255.0, support_y,
                query_x.astype(np.float32) / 255.0, query_y)

    def signature(self):
        """``tf.TensorSpec``s of a batch, all dimensions static."""
        b, n = self.meta_batch, self.n_way
        return (tf.TensorSpec((b, n * self.k_shot) + self.image_shape, tf.float32),
                tf.TensorSpec((b, n * self.k_shot), tf.int32),
                tf.TensorSpec((b, n * self.q_query) + self.image_shape, tf.float32),
                tf.TensorSpec((b, n * self.q_query), tf.int32))


def _groups_of(data, n_way):
    """``([class indices of each group with >= n_way classes], [names of the smaller groups])``,
    groups in order of first appearance; ``ValueError`` when no group is large enough."""
    members = {}
    for i, group in enumerate(data.groups):
        members.setdefault(group, []).append(i)
    kept = [np.array(m) for m in members.values() if len(m) >= n_way]
    skipped = [g for g, m in members.items() if len(m) < n_way]
    if not kept:
        largest = max(members, key=lambda g: len(members[g]))
        raise ValueError(f"within_group (--episodes_within_group): n_way={n_way} but the largest "
                         f"group, {largest!r}, has {len(members[largest])} classes; lower n_way "
                         f"or draw episodes across groups")
    if skipped:
        logging.info("within-group episodes: skipped %d of %d groups with fewer than %d classes "
                     "(%s)", len(skipped), len(members), n_way, ", ".join(skipped))
    return kept, skipped


def shift_images(images, max_shift, rng):
    """``images [..., H, W, C]``, each moved by its own offset ``(dy, dx)`` drawn uniformly from
    ``-max_shift..max_shift`` with ``rng``; pixels shifted in from outside are 0. Same dtype and
    shape. Content moved past an edge is lost, so keep ``max_shift`` within the images' margins."""
    shape = images.shape
    h, w = shape[-3], shape[-2]
    flat = images.reshape((-1,) + shape[-3:])
    n = flat.shape[0]
    dy, dx = rng.integers(-max_shift, max_shift + 1, size=(2, n))
    s = max_shift
    padded = np.pad(flat, ((0, 0), (s, s), (s, s), (0, 0)))
    rows = (np.arange(h)[None, :] + s - dy[:, None])[:, :, None]      # [n, H, 1]
    cols = (np.arange(w)[None, :] + s - dx[:, None])[:, None, :]      # [n, 1, W]
    return padded[np.arange(n)[:, None, None], rows, cols].reshape(shape)


def check_warp(max_degrees, max_scale):
    """``ValueError`` naming ``augment_rotate``/``augment_scale`` unless ``0 <= max_degrees < 180``
    and ``0 <= max_scale < 1``."""
    for name, value, limit in (("augment_rotate", max_degrees, 180),
                               ("augment_scale", max_scale, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not 0 <= value < limit:
            raise ValueError(f"{name} must be a number in [0, {limit}), got {value!r}")


def warp(images, angles, scales):
    """``images [n, H, W, C]`` rotated about their centres by ``angles [n]`` (degrees,
    counter-clockwise as displayed) and scaled by ``scales [n]``; bilinear, 0 outside, same
    dtype."""
    n, h, w, _ = images.shape
    theta = -np.deg2rad(np.asarray(angles, np.float64))[:, None, None]
    inverse = 1.0 / np.asarray(scales, np.float64)[:, None, None]
    cy, cx = (h - 1) / 2, (w - 1) / 2
    y, x = np.meshgrid(np.arange(h) - cy, np.arange(w) - cx, indexing="ij")
    # Each output pixel reads the input at the inverse map of its position.
    src_y = (np.cos(theta) * y - np.sin(theta) * x) * inverse + cy
    src_x = (np.sin(theta) * y + np.cos(theta) * x) * inverse + cx
    y0, x0 = np.floor(src_y).astype(np.int64), np.floor(src_x).astype(np.int64)
    fy, fx = (src_y - y0)[..., None], (src_x - x0)[..., None]
    padded = np.pad(images.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    item = np.arange(n)[:, None, None]

    def at(yi, xi):           # indices outside the image land on the zero border
        return padded[item, np.clip(yi + 1, 0, h + 1), np.clip(xi + 1, 0, w + 1)]
    out = ((1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x0 + 1))
           + fy * ((1 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1)))
    if np.issubdtype(images.dtype, np.integer):
        info = np.iinfo(images.dtype)
        out = np.clip(np.round(out), info.min, info.max)
    return out.astype(images.dtype)


def warp_images(images, max_degrees, max_scale, rng):
    """``images [..., H, W, C]``, each rotated by an angle from ``[-max_degrees, max_degrees]`` and
    scaled by a factor from ``[1 - max_scale, 1 + max_scale]`` (uniform, drawn with ``rng``)."""
    shape = images.shape
    flat = images.reshape((-1,) + shape[-3:])
    angles = rng.uniform(-max_degrees, max_degrees, len(flat))
    scales = rng.uniform(1 - max_scale, 1 + max_scale, len(flat))
    return warp(flat, angles, scales).reshape(shape)


def _indexed_dataset(batch_fn, signature, start_batch, num_batches, prefetch):
    def generate():
        stop = None if num_batches is None else start_batch + num_batches
        index = start_batch
        while stop is None or index < stop:
            yield batch_fn(index)
            index += 1
    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
    return ds.prefetch(prefetch) if prefetch else ds


def dataset(sampler, start_batch=None, num_batches=None, prefetch=2):
    """``tf.data.Dataset`` of the sampler's batches ``start_batch, start_batch + 1, ...`` (default:
    its current state), ``num_batches`` of them or endless, with fully static shapes, sampled on the
    host while earlier batches are consumed (``prefetch`` batches ahead).

    The dataset never changes the sampler's state, because prefetching runs ahead of consumption.
    To resume training, save how many batches the loop consumed, ``k``, and build
    ``dataset(sampler, start_batch=k)``: the continuation is identical.
    """
    start = sampler.get_state()['next_batch'] if start_batch is None else int(start_batch)
    return _indexed_dataset(sampler.batch, sampler.signature(), start, num_batches, prefetch)


def sinusoid_batch(meta_batch, k_support, k_query, seed, index):
    """Sinusoid batch ``index`` as ``(support_x, support_y, query_x, query_y)``; a pure function of
    ``(seed, index)`` like ``EpisodeSampler.batch``."""
    return tuple(data_lib.sinusoid_tasks(meta_batch, k_support, k_query,
                                         np.random.default_rng([seed, int(index)]))[:4])


class SinusoidSampler(IndexedSampler):
    """The sinusoid regression tasks with ``EpisodeSampler``'s interface, so ``dataset`` and the
    training loop treat both alike: batches ``support_x [B, K, 1], support_y, query_x [B, Q, 1],
    query_y`` (float32)."""

    def __init__(self, meta_batch, k_support, k_query, seed=0):
        check_positive(meta_batch=meta_batch, k_support=k_support, k_query=k_query)
        check_seed(seed)
        self.meta_batch, self.k_support, self.k_query = meta_batch, k_support, k_query
        self.seed = int(seed)
        self._next = 0

    def batch(self, index):
        return sinusoid_batch(self.meta_batch, self.k_support, self.k_query, self.seed, index)

    def signature(self):
        return tuple(tf.TensorSpec((self.meta_batch, k, 1), tf.float32)
                     for k in (self.k_support, self.k_support, self.k_query, self.k_query))


def sinusoid_dataset(meta_batch, k_support, k_query, seed=0, start_batch=0, num_batches=None,
                     prefetch=2):
    """``tf.data.Dataset`` of ``SinusoidSampler`` batches (static shapes); resume with
    ``start_batch`` as in ``dataset``."""
    return dataset(SinusoidSampler(meta_batch, k_support, k_query, seed), start_batch,
                   num_batches, prefetch)
