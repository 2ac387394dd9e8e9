"""Domains: named, deterministic image styles over any image ``ClassData``, and samplers that draw
each episode (or each domain's minibatch) within one domain.

A domain's name holds its parameters, so a config, a flag and a figure's legend name the same
images. Styles (uint8 images, strokes bright on a dark background as loaded Omniglot and MNIST):

- ``clean``: the images as loaded.
- ``rotate:DEGREES``: rotated counter-clockwise about the centre (bilinear, 0 outside); the
  Rotated-MNIST domains are ``rotate:0`` to ``rotate:75`` in steps of 15.
- ``dilate:R`` / ``erode:R``: thicker / thinner strokes, each pixel the maximum / minimum over
  the ``(2R+1) x (2R+1)`` square around it (grey-scale morphology).
- ``blur:SIGMA``: Gaussian blur with standard deviation ``SIGMA`` pixels (0 outside).
- ``noise:STD``: Gaussian noise with standard deviation ``STD`` of the 0-255 range, clipped.
- ``invert``: ``v -> 255 - v``.
- ``elastic:ALPHA:SIGMA``: Simard et al. (2003)'s elastic distortion: a displacement field
  uniform in [-1, 1] per pixel, Gaussian-smoothed with ``SIGMA``, times ``ALPHA`` (MNIST: 34:4).

Styles compose with ``+`` (``rotate:30+blur:1``), applied left to right. Random styles draw from
``numpy.random.default_rng([seed, crc32(domain), crc32(class name)])``, so a domain's images depend
only on the name, the seed and the class, never on which other classes are loaded. Example::

    data = data_lib.synthetic(10, 20)
    blurred = domains.apply(data, "blur:1.5")
    sampler = domains.DomainEpisodeSampler(data, ["clean", "rotate:45"], n_way=5, k_shot=1,
                                           q_query=5, meta_batch=4)
"""

import math
import zlib
from typing import NamedTuple, Tuple

import numpy as np
import tensorflow as tf

from functional_meta import data as data_lib
from functional_meta import episodes

# kind -> the parameters in its name: (name, type, check, what the check requires)
KINDS = {
    "clean": (),
    "invert": (),
    "rotate": (("degrees", float, lambda v: -360 <= v <= 360, "in [-360, 360]"),),
    "dilate": (("radius", int, lambda v: 1 <= v <= 10, "an integer in [1, 10]"),),
    "erode": (("radius", int, lambda v: 1 <= v <= 10, "an integer in [1, 10]"),),
    "blur": (("sigma", float, lambda v: 0 < v <= 10, "in (0, 10]"),),
    "noise": (("std", float, lambda v: 0 < v <= 1, "in (0, 1]"),),
    "elastic": (("alpha", float, lambda v: 0 < v <= 1000, "in (0, 1000]"),
                ("sigma", float, lambda v: 0 < v <= 10, "in (0, 10]")),
}
FORMS = ("clean, invert, rotate:DEGREES, dilate:RADIUS, erode:RADIUS, blur:SIGMA, noise:STD, "
         "elastic:ALPHA:SIGMA, or styles joined by '+' (e.g. rotate:30+blur:1)")
ROTATED_MNIST = tuple(f"rotate:{a}" for a in (0, 15, 30, 45, 60, 75))


class Style(NamedTuple):
    """One style of a domain: its kind and its parameters, as in the name ``kind:p1:p2``."""
    kind: str
    params: Tuple = ()


def _number(value):
    """The shortest text that parses back to ``value`` (``45.0`` -> ``'45'``)."""
    if isinstance(value, int):
        return str(value)
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def parse(name):
    """The styles of a domain name, a tuple of ``Style``; a ``ValueError`` names the allowed
    forms."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a domain name must be a non-empty string, got {name!r}; allowed "
                         f"forms: {FORMS}")
    parts = name.strip().split("+")
    styles = []
    for part in parts:
        kind, *texts = part.strip().split(":")
        if kind not in KINDS:
            raise ValueError(f"unknown style {kind!r} in domain {name!r}; allowed forms: {FORMS}")
        specs = KINDS[kind]
        if len(texts) != len(specs):
            form = ":".join([kind] + [s[0].upper() for s in specs])
            raise ValueError(f"domain {name!r}: {kind} takes {len(specs)} parameter(s), as "
                             f"{form}; allowed forms: {FORMS}")
        params = []
        for text, (pname, cast, check, need) in zip(texts, specs):
            try:
                value = cast(text)
            except ValueError:
                value = None
            if value is None or not math.isfinite(value) or not check(value):
                raise ValueError(f"domain {name!r}: {kind}'s {pname} must be {need}, got {text!r}; "
                                 f"allowed forms: {FORMS}")
            params.append(value)
        styles.append(Style(kind, tuple(params)))
    if len(styles) > 1 and any(s.kind == "clean" for s in styles):
        raise ValueError(f"domain {name!r}: 'clean' cannot be combined with other styles")
    return tuple(styles)


def format_name(styles):
    """The canonical name of ``styles`` (a tuple of ``Style``); ``parse(format_name(s)) == s``."""
    return "+".join(":".join([s.kind] + [_number(p) for p in s.params]) for s in styles)


def canonical(name):
    """``name`` in its canonical spelling (``'rotate:45.0'`` -> ``'rotate:45'``), checked."""
    return format_name(parse(name))


def parse_list(names):
    """Canonical names of a list (or a ``','``-joined string) of domains; no duplicates."""
    if isinstance(names, str):
        names = names.split(",")
    names = [canonical(n) for n in names]
    if not names:
        raise ValueError(f"at least one domain is needed; allowed forms: {FORMS}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"domains {repeated} are listed more than once")
    return names


# ----------------------------------------------------------------------------------------------
# The styles, on uint8 arrays [n, H, W, C]


def gaussian_kernel(sigma):
    """The normalised 1-D Gaussian of standard deviation ``sigma``, radius ``ceil(3 sigma)``."""
    radius = max(1, math.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return k / k.sum()


def gaussian_filter(x, sigma, mode="constant"):
    """``x [n, H, W, C]`` (float) convolved with the separable Gaussian along H and W; outside
    the image ``mode`` of ``numpy.pad`` (``'constant'``: 0)."""
    k = gaussian_kernel(sigma)
    r = len(k) // 2
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (r, r)
        padded = np.pad(x, pad, mode=mode)
        size = x.shape[axis]
        x = sum(w * np.take(padded, np.arange(i, i + size), axis=axis) for i, w in enumerate(k))
    return x


def _extreme_filter(x, radius, reduce, fill):
    """Max or min (``reduce``) over the ``(2r+1)^2`` square around each pixel, ``fill`` outside."""
    h, w = x.shape[1:3]
    padded = np.pad(x, [(0, 0), (radius, radius), (radius, radius), (0, 0)], constant_values=fill)
    views = [padded[:, i:i + h, j:j + w] for i in range(2 * radius + 1)
             for j in range(2 * radius + 1)]
    return reduce(np.stack(views), axis=0)


def _bilinear(images, src_y, src_x):
    """``images [n, H, W, C]`` (float) read at real coordinates ``src_y, src_x [n, H, W]``, 0
    outside the image."""
    n, h, w, _ = images.shape
    y0, x0 = np.floor(src_y).astype(np.int64), np.floor(src_x).astype(np.int64)
    fy, fx = (src_y - y0)[..., None], (src_x - x0)[..., None]
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    item = np.arange(n)[:, None, None]

    def at(yi, xi):
        return padded[item, np.clip(yi + 1, 0, h + 1), np.clip(xi + 1, 0, w + 1)]
    return ((1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x0 + 1))
            + fy * ((1 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1)))


def _elastic(x, alpha, sigma, rng):
    n, h, w, _ = x.shape
    field = rng.uniform(-1, 1, size=(2, n, h, w, 1))
    dy, dx = (alpha * gaussian_filter(f, sigma, mode="reflect")[..., 0] for f in field)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return _bilinear(x, rows + dy, cols + dx)


def _style(x, style, rng):
    """One style on float images ``x [n, H, W, C]`` in 0..255."""
    kind, params = style
    if kind == "clean":
        return x
    if kind == "invert":
        return 255.0 - x
    if kind == "rotate":
        return episodes.warp(x, np.full(len(x), params[0]), np.ones(len(x)))
    if kind == "dilate":
        return _extreme_filter(x, params[0], np.max, 0.0)
    if kind == "erode":
        return _extreme_filter(x, params[0], np.min, 255.0)
    if kind == "blur":
        return gaussian_filter(x, params[0])
    if kind == "noise":
        return x + rng.normal(0.0, 255.0 * params[0], size=x.shape)
    return _elastic(x, params[0], params[1], rng)


def transform(images, name, rng=None):
    """``images [n, H, W, C]`` uint8 in the domain ``name`` (same shape, uint8). ``rng``: a
    ``numpy.random.Generator`` for the random styles (noise, elastic); required by them."""
    styles = parse(name)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [n, H, W, C], got {images.dtype} {images.shape}")
    if rng is None and any(s.kind in ("noise", "elastic") for s in styles):
        raise ValueError(f"domain {name!r} is random: pass rng")
    if styles == (Style("clean"),):
        return images
    x = images.astype(np.float64)
    for style in styles:
        x = _style(x, style, rng)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _class_rng(name, class_name, seed):
    return np.random.default_rng([seed, zlib.crc32(name.encode()), zlib.crc32(class_name.encode())])


def apply(data, name, seed=0):
    """``data`` (a ``ClassData``) in domain ``name``: the same classes, names and groups, every
    image transformed; a pure function of ``(data, canonical name, seed)``, class by class."""
    name = canonical(name)
    if name == "clean":
        return data
    images = [transform(x, name, _class_rng(name, c, seed))
              for x, c in zip(data.images, data.names)]
    return data_lib.ClassData(images, list(data.names), list(data.groups))


def partition(data, parts, seed=0):
    """``parts`` ``ClassData`` with the same classes and disjoint images: each class's images
    shuffled with ``seed`` and cut into ``parts`` near-equal pieces (DomainBed's Rotated MNIST
    gives each domain its own digits)."""
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts must be a positive integer, got {parts!r}")
    smallest = min(len(x) for x in data.images)
    if smallest < parts:
        raise ValueError(f"a class has {smallest} images, fewer than the {parts} parts asked")
    pieces = [[] for _ in range(parts)]
    for i, x in enumerate(data.images):
        order = np.random.default_rng([seed, i]).permutation(len(x))
        for piece, idx in zip(pieces, np.array_split(order, parts)):
            piece.append(x[np.sort(idx)])
    return [data_lib.ClassData(p, list(data.names), list(data.groups)) for p in pieces]


# ----------------------------------------------------------------------------------------------
# Samplers


class DomainEpisodeSampler(episodes.IndexedSampler):
    """``EpisodeSampler``'s batches where every episode lies within one domain.

    Episode ``j`` of batch ``i`` takes its domain uniformly at random (from the generator
    ``default_rng([seed, i, 1])``) and is episode ``i * meta_batch + j`` of that domain's
    ``EpisodeSampler`` (``meta_batch=1``, the same ``seed`` and ``augment_*``): batch ``i`` is a
    pure function of ``(seed, i)``. ``domain_seed`` fixes the random styles' images.
    ``domains_of(i)`` says which domain each episode of batch ``i`` came from.
    """

    def __init__(self, data, domains, n_way, k_shot, q_query, meta_batch=1, seed=0, domain_seed=0,
                 **augment):
        episodes.check_positive(meta_batch=meta_batch)
        self.domains = parse_list(domains)
        self._samplers = [episodes.EpisodeSampler(apply(data, d, domain_seed), n_way, k_shot,
                                                  q_query, meta_batch=1, seed=seed, **augment)
                          for d in self.domains]
        first = self._samplers[0]
        self.n_way, self.k_shot, self.q_query = first.n_way, first.k_shot, first.q_query
        self.image_shape, self.meta_batch, self.seed = first.image_shape, meta_batch, first.seed
        self._next = 0

    def domains_of(self, index):
        """Indices into ``self.domains`` of batch ``index``'s episodes, ``[meta_batch]``."""
        rng = np.random.default_rng([self.seed, int(index), 1])
        return rng.integers(len(self.domains), size=self.meta_batch)

    def batch(self, index):
        parts = [self._samplers[d].batch(int(index) * self.meta_batch + j)
                 for j, d in enumerate(self.domains_of(index))]
        return tuple(np.concatenate(column) for column in zip(*parts))

    def signature(self):
        b = self.meta_batch
        return tuple(tf.TensorSpec((b,) + s.shape[1:], s.dtype)
                     for s in self._samplers[0].signature())


class DomainBatchSampler(episodes.IndexedSampler):
    """Supervised minibatches over a fixed label set, one per training domain: batch ``i`` is
    ``(x [D, n, H, W, C] float32 in [0, 1], y [D, n] int32)`` with ``n = batch_size`` images drawn
    at random from each domain's ``ClassData`` (label = class index; every domain must have the
    same classes), the domains in a random order (so MLDG's meta-test domains, the last ones, are
    a random split each step). A pure function of ``(seed, i)``. ``meta_batch`` is ``D``."""

    def __init__(self, datasets, batch_size, seed=0):
        episodes.check_positive(batch_size=batch_size)
        episodes.check_seed(seed)
        if not datasets:
            raise ValueError("DomainBatchSampler needs at least one domain's data")
        names = [list(d.names) for d in datasets]
        if any(n != names[0] for n in names):
            raise ValueError("every domain must have the same classes in the same order")
        shapes = {x.shape[1:] for d in datasets for x in d.images}
        if len(shapes) != 1:
            raise ValueError(f"all images must have one shape, got {sorted(shapes)}")
        self.image_shape = shapes.pop()
        self._images = [np.concatenate(d.images) for d in datasets]
        self._labels = [np.repeat(np.arange(len(d), dtype=np.int32), [len(x) for x in d.images])
                        for d in datasets]
        smallest = min(len(y) for y in self._labels)
        if batch_size > smallest:
            raise ValueError(f"batch_size={batch_size} but a domain has only {smallest} images")
        self.batch_size, self.meta_batch, self.seed = batch_size, len(datasets), int(seed)
        self._next = 0

    def batch(self, index):
        rng = np.random.default_rng([self.seed, int(index)])
        xs, ys = [], []
        for d in rng.permutation(self.meta_batch):
            pick = rng.choice(len(self._labels[d]), self.batch_size, replace=False)
            xs.append(self._images[d][pick])
            ys.append(self._labels[d][pick])
        return np.stack(xs).astype(np.float32) / 255.0, np.stack(ys)

    def signature(self):
        d, n = self.meta_batch, self.batch_size
        return (tf.TensorSpec((d, n) + self.image_shape, tf.float32),
                tf.TensorSpec((d, n), tf.int32))


def labelled(data):
    """All images of ``data`` in class order with their labels (class indices): ``(x [N, H, W, C]
    float32 in [0, 1], y [N] int32)``, for scoring a fixed-label-set classifier."""
    x = np.concatenate(data.images).astype(np.float32) / 255.0
    y = np.repeat(np.arange(len(data), dtype=np.int32), [len(i) for i in data.images])
    return x, y


# ----------------------------------------------------------------------------------------------
# Figures (matplotlib, imported only here: ``functional_meta.plots``)


def plot_examples(data, names, path, per_domain=8, seed=0, domain_seed=0):
    """A grid of example images, one row per domain of ``names``, the same images of
    ``per_domain`` classes (chosen with ``seed``) in every row; writes a PNG to ``path``."""
    from functional_meta import plots
    names = parse_list(names)
    rng = np.random.default_rng(seed)
    classes = rng.choice(len(data), min(per_domain, len(data)), replace=False)
    picked = data_lib.subset(data, classes)
    plt = plots._pyplot()
    fig, axes = plt.subplots(len(names), len(classes), squeeze=False,
                             figsize=(0.9 * len(classes) + 1.2, 0.9 * len(names)))
    for row, name in zip(axes, names):
        styled = apply(picked, name, domain_seed)
        for ax, images in zip(row, styled.images):
            ax.imshow(images[0, :, :, 0] if images.shape[-1] == 1 else images[0],
                      cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    return plots._save(fig, path)


def plot_accuracy(rows, path, title=None):
    """Grouped bars: accuracy per target domain (x) per method (colour), with 95% intervals.
    ``rows``: dicts with ``target``, ``method``, ``accuracy``, ``accuracy_ci95`` (fractions)."""
    from functional_meta import plots
    targets = list(dict.fromkeys(r["target"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    plt = plots._pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(targets) * max(1, len(methods)) / 3, 3.6))
    width = 0.8 / len(methods)
    for m, method in enumerate(methods):
        found = {r["target"]: r for r in rows if r["method"] == method}
        xs = [t + (m - (len(methods) - 1) / 2) * width for t, name in enumerate(targets)
              if name in found]
        values = [100 * float(found[n]["accuracy"]) for n in targets if n in found]
        errors = [100 * float(found[n]["accuracy_ci95"]) for n in targets if n in found]
        ax.bar(xs, values, width, yerr=errors, capsize=2, label=method)
    ax.set_xticks(range(len(targets)))
    ax.set_xticklabels(targets)
    ax.set_ylabel("accuracy (%)")
    ax.set_xlabel("target domain")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        ax.set_title(title)
    return plots._save(fig, path)
