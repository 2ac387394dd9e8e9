"""Data sources: every image source returns a ``ClassData`` of decoded uint8 images, one array per
class, held in memory so episode sampling never touches the disk.

Sources: Omniglot (official zips/folders or TFDS), MNIST (Keras ``.npz`` or TFDS), any image folder,
synthetic classes, plus class splits/selection and the MAML sinusoid regression tasks.
"""

import collections
import dataclasses
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import List, NamedTuple

import numpy as np
import tensorflow as tf
from absl import logging

from functional_meta import choices

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif')
ROTATIONS = (90, 180, 270)


@dataclasses.dataclass(frozen=True)
class ClassData:
    """Classes of images. ``images[i]`` is a uint8 array ``[n_i, H, W, C]`` of class ``names[i]``;
    ``groups[i]`` is its group (the Omniglot alphabet, a folder's parent, else the class name).
    ``len(data)`` is the number of classes."""
    images: List[np.ndarray]
    names: List[str]
    groups: List[str]

    def __len__(self):
        return len(self.names)


def subset(data, indices):
    """The classes at ``indices`` (in that order)."""
    return ClassData([data.images[i] for i in indices], [data.names[i] for i in indices],
                     [data.groups[i] for i in indices])


def _check_groups(data, groups):
    groups = [groups] if isinstance(groups, str) else list(groups)
    missing = sorted(set(groups) - set(data.groups))
    if missing:
        raise ValueError(f"groups {missing} not in the data; available: {sorted(set(data.groups))}")
    return set(groups)


def select_groups(data, groups):
    """Only the classes whose group is in ``groups`` (e.g. Omniglot alphabets)."""
    keep = _check_groups(data, groups)
    return subset(data, [i for i, g in enumerate(data.groups) if g in keep])


def exclude_groups(data, groups):
    """All classes except those whose group is in ``groups``."""
    drop = _check_groups(data, groups)
    return subset(data, [i for i, g in enumerate(data.groups) if g not in drop])


def _base_name(name):
    """Class name without a rotation suffix, so a class and its rotations are split together."""
    head, _, tail = name.rpartition('/rot')
    return head if head and tail in {str(r) for r in ROTATIONS} else name


def split_classes(data, sizes, seed=0, by_group=True):
    """Disjoint splits (e.g. meta-train/val/test) of ``data``'s classes, fixed by ``seed``.

    ``sizes`` are fractions (floats, sum <= 1) or counts (ints) of units: groups when ``by_group``
    (so no alphabet is shared between splits), else classes. Rotated copies of a class always land
    in the same split. Returns one ``ClassData`` per size, classes in their original order.
    """
    keys = data.groups if by_group else [_base_name(n) for n in data.names]
    units = sorted(set(keys))
    if any(s < 0 for s in sizes):
        raise ValueError(f"sizes must be non-negative, got {list(sizes)}")
    if all(isinstance(s, (int, np.integer)) for s in sizes):
        if sum(sizes) > len(units):
            raise ValueError(f"sizes={list(sizes)} ask for {sum(sizes)} "
                             f"{'groups' if by_group else 'classes'} but the data has {len(units)}")
        ends = np.cumsum(sizes)
    else:
        if sum(sizes) > 1 + 1e-9:
            raise ValueError(f"fractions sizes={list(sizes)} sum to more than 1")
        ends = np.round(np.cumsum(sizes) * len(units)).astype(int)
    order = np.random.default_rng(seed).permutation(len(units))
    starts = np.concatenate([[0], ends[:-1]])
    splits = []
    for start, end in zip(starts, ends):
        chosen = {units[j] for j in order[start:end]}
        splits.append(subset(data, [i for i, k in enumerate(keys) if k in chosen]))
    return tuple(splits)


def _with_rotations(data):
    """Each class followed by its 90/180/270 degree rotations as new classes (same group)."""
    images, names, groups = [], [], []
    for x, name, group in zip(data.images, data.names, data.groups):
        for k, suffix in enumerate([''] + [f'/rot{r}' for r in ROTATIONS]):
            images.append(np.ascontiguousarray(np.rot90(x, k, axes=(1, 2))))
            names.append(name + suffix)
            groups.append(group)
    return ClassData(images, names, groups)


def _from_labels(images, labels, names, groups):
    """``ClassData`` from a flat array of images and integer labels (class ``j`` is label
    ``sorted(set(labels))[j]``); ``names``/``groups`` map a label to strings."""
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    per_class = np.split(images[np.argsort(inverse, kind='stable')], np.cumsum(counts)[:-1])
    return ClassData(per_class, [names(c) for c in classes], [groups(c) for c in classes])


def _preprocess(image, channels, image_size, invert):
    """One decoded image tensor -> uint8 ``[size, size, channels]`` (area-resized, i.e. antialiased)."""
    if channels == 1 and image.shape[-1] == 3:
        image = tf.image.rgb_to_grayscale(image)
    if not invert and image_size is None:
        return image
    image = tf.cast(image, tf.float32)
    if invert:
        image = 255.0 - image
    if image_size is not None:
        image = tf.image.resize(image, [image_size, image_size], method='area')
    return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def _decode_one(blob, channels):
    return tf.io.decode_image(blob, channels=channels, expand_animations=False)


def _decode(blobs, files, channels, image_size, invert):
    """Encoded images -> uint8 ``[n, H, W, channels]`` and a ``Counter`` of the decoded images'
    ``(height, width)`` before any resize, decoded in parallel with tf.data.

    On failure each file is decoded alone to name the one that is corrupt or of a different size.
    """
    def fn(blob):
        image = _decode_one(blob, channels)
        return _preprocess(image, channels, image_size, invert), tf.shape(image)[:2]
    try:
        ds = tf.data.Dataset.from_tensor_slices(tf.constant(blobs, dtype=tf.string))
        ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE).batch(1024)
        images, sizes = zip(*ds.as_numpy_iterator())
        return np.concatenate(images), collections.Counter(map(tuple, np.concatenate(sizes)))
    except tf.errors.OpError as error:
        shape = None
        for blob, file in zip(blobs, files):
            try:
                image = _preprocess(_decode_one(blob, channels), channels, image_size, invert)
            except tf.errors.OpError:
                raise ValueError(f"cannot decode image file {file}") from None
            if shape is not None and image.shape != shape:
                raise ValueError(f"image file {file} has shape {image.shape.as_list()} but earlier "
                                 f"images have {shape.as_list()}; pass image_size to resize") from None
            shape = image.shape
        raise error


def _load_files(entries, channels, image_size, invert):
    """``entries``: (class name, group, file name, encoded bytes) -> ``ClassData`` (classes sorted
    by name, files sorted within a class) and the ``Counter`` of the files' sizes (``_decode``)."""
    entries = sorted(entries, key=lambda e: (e[0], e[2]))
    images, sizes = _decode([e[3] for e in entries], [e[2] for e in entries], channels,
                            image_size, invert)
    labels = np.array([e[0] for e in entries])
    group_of = {e[0]: e[1] for e in entries}
    return _from_labels(images, labels, str, group_of.get), sizes


def _looks_like_zip(path):
    """A file named ``*.zip`` or starting with a zip signature, readable or not."""
    if path.suffix.lower() == '.zip':
        return True
    with open(path, 'rb') as f:
        return f.read(2) == b'PK'


def _read_zip(path, keep):
    """``(member name, bytes)`` of the members of the zip file ``path`` whose name passes
    ``keep``. A damaged archive (e.g. truncated by an interrupted download) or member is a
    ``ValueError`` naming the file and member, not zipfile's or zlib's traceback."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, OSError):
        raise ValueError(f"zip file {path} is damaged: its list of members (at the end of the "
                         "file) cannot be read; it may be truncated, e.g. by an interrupted "
                         "download: download it again") from None
    with archive:
        members = []
        for name in archive.namelist():
            if keep(name):
                try:
                    members.append((name, archive.read(name)))
                except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
                    raise ValueError(f"zip file {path} is damaged: member {name} cannot be read "
                                     f"({error}); download the zip again") from None
    return members


def _omniglot_entries(path):
    """(class, alphabet, file, bytes) for every PNG in an Omniglot zip or extracted folder."""
    path = Path(path)
    if path.is_file() and _looks_like_zip(path):
        files = [(n.split('/'), f'{path}:{n}', blob) for n, blob in _read_zip(
            path, lambda n: n.lower().endswith('.png') and '__MACOSX' not in n)]
    elif path.is_dir():
        files = [(p.relative_to(path).parts, str(p), p.read_bytes()) for p in path.rglob('*.png')]
    else:
        raise ValueError(f"Omniglot path {path} is neither a zip file nor a folder")
    entries = [(f'{parts[-3]}/{parts[-2]}', parts[-3], file, blob)
               for parts, file, blob in files if len(parts) >= 3]
    if not entries:
        raise ValueError(f"no Omniglot images (<alphabet>/<character>/<file>.png) in {path}")
    return entries


def omniglot_zip(paths, image_size=28, rotations=False):
    """Omniglot from the official zips (``images_background.zip``, ``images_evaluation.zip``,
    ``images_background_small1/2.zip``) or their extracted folders.

    Class ``'Alphabet/characterNN'``, group ``'Alphabet'``; a class found in several paths is taken
    once (the small zips share Greek and Latin). Images are grayscale, inverted (strokes 255,
    background 0) and area-resized to ``image_size``; ``rotations`` adds each class rotated by
    90/180/270 degrees as new classes ``'.../rot90'`` etc.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    entries, seen = [], set()
    for path in paths:
        new = _omniglot_entries(path)
        entries += [e for e in new if e[0] not in seen]
        seen |= {e[0] for e in new}
    data, _ = _load_files(entries, 1, image_size, invert=True)
    return _with_rotations(data) if rotations else data


def image_folder(root, image_size=None, grayscale=False, invert=False):
    """Images in ``root/<class>/*.png|jpg`` or ``root/<group>/<class>/*.png|jpg`` (layout detected).

    Class names are ``'class'`` or ``'group/class'``; groups the parent folder (else the class).
    Without ``image_size`` all images must already share one size (else a ``ValueError`` names
    the first that differs). With it every image is area-resized to ``image_size`` squared; the
    resize is logged once, as a warning naming how many images of which sizes when the folder
    mixes sizes (their aspect ratios are not kept), else as an info line. ``grayscale`` gives 1
    channel, else 3; ``invert`` maps v -> 255 - v (for dark strokes on white, like Omniglot).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob('*') if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"image folder {root} has no images ({'/'.join(IMAGE_SUFFIXES)})")
    depths = {len(p.relative_to(root).parts) for p in files}
    if depths not in ({2}, {3}):
        raise ValueError(f"image folder {root} mixes layouts: expected root/class/image or "
                         f"root/group/class/image for every image")
    entries = []
    for p in files:
        parts = p.relative_to(root).parts[:-1]
        entries.append(('/'.join(parts), parts[0], str(p), p.read_bytes()))
    data, sizes = _load_files(entries, 1 if grayscale else 3, image_size, invert)
    resized = {size: n for size, n in sizes.items() if size != (image_size, image_size)}
    if image_size is not None and resized:
        counts = ', '.join(f'{n} of {h}x{w}' for (h, w), n in sorted(
            resized.items(), key=lambda item: -item[1]))
        if len(sizes) > 1:
            logging.warning("image folder %s mixes %d image sizes: resized %d of its %d images "
                            "(%s) to %dx%d, not keeping their aspect ratios", root, len(sizes),
                            sum(resized.values()), len(files), counts, image_size, image_size)
        else:
            logging.info("image folder %s: resized its %d images (%s) to %dx%d", root,
                         len(files), counts, image_size, image_size)
    return data


def _load_tfds(name, split, data_dir, image_size, invert, keys):
    """All examples of a TFDS split as numpy: (images, *features named in ``keys``), and the info."""
    import tensorflow_datasets as tfds  # only needed for TFDS sources
    ds, info = tfds.load(name, split=split, data_dir=data_dir, with_info=True)
    ds = ds.map(lambda ex: (_preprocess(ex['image'], 1, image_size, invert),)
                + tuple(ex[k] for k in keys), num_parallel_calls=tf.data.AUTOTUNE).batch(1024)
    batches = list(ds.as_numpy_iterator())
    if not batches:
        raise ValueError(f"TFDS {name} split {split!r} is empty")
    return [np.concatenate(column) for column in zip(*batches)], info


def omniglot_tfds(split, image_size=28, rotations=False, data_dir=None):
    """Omniglot from ``tfds.load('omniglot', split=split)`` (splits train, test, small1, small2),
    one class per ``label``, group = alphabet; names ``'Alphabet/characterNN'`` as in
    ``omniglot_zip``, same preprocessing."""
    (images, labels, alphabets, chars), info = _load_tfds(
        'omniglot', split, data_dir, image_size, True, ('label', 'alphabet', 'alphabet_char_id'))
    alphabet_names = info.features['alphabet'].names
    first = {label: i for i, label in reversed(list(enumerate(labels)))}
    def group(label):
        return alphabet_names[alphabets[first[label]]]
    def name(label):
        return f'{group(label)}/character{chars[first[label]] + 1:02d}'
    data = _from_labels(images, labels, name, group)
    return _with_rotations(data) if rotations else data


def _digits(images, labels):
    images = np.asarray(images, np.uint8)
    images = images[..., None] if images.ndim == 3 else images
    return _from_labels(images, np.asarray(labels).astype(np.int64).ravel(), str, str)


def mnist_npz(path, split='train'):
    """MNIST digits 0-9 (class names ``'0'``..``'9'``) from a Keras-layout ``.npz``
    (``x_train, y_train, x_test, y_test``); images ``[n, 28, 28, 1]``."""
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    with np.load(path) as arrays:
        return _digits(arrays[f'x_{split}'], arrays[f'y_{split}'])


def mnist_tfds(split='train', data_dir=None):
    """MNIST digits 0-9 from ``tfds.load('mnist', split=split)``."""
    (images, labels), _ = _load_tfds('mnist', split, data_dir, None, False, ('label',))
    return _digits(images, labels)


def synthetic(num_classes, per_class, shape=(28, 28, 1), seed=0):
    """Random uint8 classes: each class is a random prototype image plus noise, so it is learnable."""
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(32, 224, size=(num_classes, 1) + tuple(shape))
    noise = rng.normal(0, 24, size=(num_classes, per_class) + tuple(shape))
    images = np.clip(np.round(prototypes + noise), 0, 255).astype(np.uint8)
    names = [f'class{i:04d}' for i in range(num_classes)]
    return ClassData(list(images), names, list(names))


class SinusoidTasks(NamedTuple):
    """A meta-batch of sinusoid regression tasks ``y = amplitude * sin(x - phase)``."""
    support_x: np.ndarray  # [B, K, 1] float32
    support_y: np.ndarray
    query_x: np.ndarray    # [B, Q, 1] float32
    query_y: np.ndarray
    amplitude: np.ndarray  # [B] float32
    phase: np.ndarray


def sinusoid_tasks(meta_batch, k_support, k_query, rng=0):
    """``meta_batch`` sinusoid tasks as in the MAML paper: amplitude U[0.1, 5], phase U[0, pi],
    inputs U[-5, 5]. ``rng`` is a seed or a ``numpy.random.Generator``."""
    rng = np.random.default_rng(rng)
    amplitude = rng.uniform(0.1, 5.0, size=meta_batch)
    phase = rng.uniform(0.0, math.pi, size=meta_batch)
    x = rng.uniform(-5.0, 5.0, size=(meta_batch, k_support + k_query, 1))
    y = amplitude[:, None, None] * np.sin(x - phase[:, None, None])
    x, y = x.astype(np.float32), y.astype(np.float32)
    return SinusoidTasks(x[:, :k_support], y[:, :k_support], x[:, k_support:], y[:, k_support:],
                         amplitude.astype(np.float32), phase.astype(np.float32))


SOURCES = choices.IMAGE_SOURCES


def load(source, path=None, split='train', image_size=28, rotations=False, image_shape=(28, 28, 1),
         seed=0):
    """One call for every image source, as the binaries' ``--data``/``--data_path`` flags name them.

    ``omniglot``: ``path`` is a zip or folder, or several joined with ``,``. ``omniglot_tfds`` and
    ``mnist_tfds``: ``split`` is the TFDS split and ``path`` an optional ``data_dir``. ``mnist``: a
    Keras ``.npz``. ``folder``: an image folder. ``synthetic``: 64 classes of 20 images of
    ``image_shape`` (no ``path``). Errors name the source or path and what would be accepted.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; choose one of {list(SOURCES)}")
    needs_path = source in ('omniglot', 'mnist', 'folder')
    if needs_path and not path:
        raise ValueError(f"data source {source!r} needs a path (--data_path)")
    if needs_path:
        for p in str(path).split(','):
            if not os.path.exists(p):
                raise ValueError(f"data path {p} does not exist")
    if source == 'synthetic':
        return synthetic(64, 20, image_shape, seed)
    if source == 'omniglot':
        return omniglot_zip(str(path).split(','), image_size, rotations)
    if source == 'omniglot_tfds':
        return omniglot_tfds(split, image_size, rotations, data_dir=path)
    if source == 'mnist':
        return mnist_npz(path, split)
    if source == 'mnist_tfds':
        return mnist_tfds(split, data_dir=path)
    return image_folder(path, image_size=image_size, grayscale=image_shape[-1] == 1)
