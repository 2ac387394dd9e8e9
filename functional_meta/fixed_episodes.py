"""Fixed episode files: score a model on episodes written down once, so that a number means the
same for everyone who scores on them.

Two layouts, each a folder or a zip of it:

- Lake et al.'s one-shot classification runs (Lake, Salakhutdinov & Tenenbaum, Science 2015; the
  ``all_runs.zip`` of the Omniglot repository): ``runNN/training/classMM.png`` (one drawing of each
  of 20 characters), ``runNN/test/itemMM.png`` (20 other drawings) and ``runNN/class_labels.txt``,
  one line ``runNN/test/itemMM.png runNN/training/classKK.png`` per test drawing naming its class.
  Each run is one 20-way 1-shot episode with 20 queries; the paper reports the error rate of each
  run and their mean (``LAKE_FIGURES``).
- Episode folders (the Meta-Dataset practice): ``EPISODE/support/CLASS/*.png`` and
  ``EPISODE/query/CLASS/*.png``. An episode's classes, sorted by name, get the labels 0..N-1.
  ``save_episodes`` writes sampled episodes in this layout, so a result can be scored again on
  exactly the same episodes.

Images are decoded and preprocessed as the training data were (``preprocessing(config)``, which
``data.load`` applies: grey levels, inversion, area resizing), then scaled to [0, 1] floats as
``episodes.EpisodeSampler`` gives them.

Typical use::

    runs = fixed_episodes.read(path, fixed_episodes.preprocessing(config))
    values = fixed_episodes.score(evaluator, state, runs)      # {'accuracy': [one per episode]}
"""

import zipfile
from pathlib import Path, PurePosixPath
from typing import List, NamedTuple

import numpy as np
import tensorflow as tf

from functional_meta import data as data_lib

LABELS_FILE = "class_labels.txt"
SETS = ("support", "query")
# Error rates (%) on the 20 runs, as published: Lake et al. 2015 (people, Bayesian program
# learning, their deep convolutional network) and Koch, Zemel & Salakhutdinov 2015 (Siamese).
LAKE_FIGURES = (("people", 4.5), ("Bayesian program learning (Lake et al. 2015)", 3.3),
                ("deep convnet (Lake et al. 2015)", 13.5),
                ("Siamese network (Koch et al. 2015)", 8.0))


class Preprocessing(NamedTuple):
    """How image files become arrays: ``channels`` (1 grey, 3 RGB), ``image_size`` (square side
    after area resizing) and ``invert`` (v -> 255 - v, Omniglot's strokes become 255)."""
    channels: int
    image_size: int
    invert: bool


class Episode(NamedTuple):
    """One fixed episode: uint8 images ``[S, H, W, C]``/``[M, H, W, C]`` and int32 labels;
    ``classes[j]`` names label ``j``."""
    name: str
    support_x: np.ndarray
    support_y: np.ndarray
    query_x: np.ndarray
    query_y: np.ndarray
    classes: List[str]

    @property
    def n_way(self):
        return len(self.classes)


def preprocessing(config):
    """The ``Preprocessing`` a training ``config`` gave its images (``data.load``): Omniglot
    grey, inverted and resized; an image folder resized, grey when ``image_shape`` has one
    channel; MNIST and synthetic images as they are, at ``image_shape``."""
    shape = tuple(config["image_shape"])
    if config["data"] == "sinusoid" or len(shape) != 3 or shape[0] != shape[1]:
        raise ValueError(f"fixed episodes are square images; this config has data="
                         f"{config['data']!r} and image_shape={list(shape)}")
    return Preprocessing(shape[2], shape[0], config["data"] in ("omniglot", "omniglot_tfds"))


def _tree(path):
    """``{relative POSIX path: bytes}`` of every file in a zip or folder (macOS metadata left out),
    and a function naming a relative path for error messages."""
    path = Path(path)
    if path.is_dir():
        files = {p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file()}
        return {k: p.read_bytes() for k, p in files.items() if "__MACOSX" not in k}, \
            lambda key: str(path / key)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return {n: archive.read(n) for n in archive.namelist()
                    if not n.endswith("/") and "__MACOSX" not in n}, lambda key: f"{path}:{key}"
    raise ValueError(f"episodes path {path} is neither a folder nor a zip file")


def _is_image(key):
    return PurePosixPath(key).suffix.lower() in data_lib.IMAGE_SUFFIXES


def _images(tree, keys, where, prep):
    """uint8 ``[n, size, size, channels]`` of the files ``keys`` of ``tree``, through the data
    sources' own preprocessing (``data._preprocess``)."""
    images = []
    for key in keys:
        try:
            image = tf.io.decode_image(tree[key], channels=prep.channels, expand_animations=False)
        except tf.errors.OpError:
            raise ValueError(f"cannot decode image file {where(key)}") from None
        images.append(data_lib._preprocess(image, prep.channels, prep.image_size,
                                           prep.invert).numpy())
    return np.stack(images)


def is_lake(path):
    """Whether ``path`` (zip or folder) holds Lake et al.'s runs (a ``class_labels.txt``)."""
    path = Path(path)
    if path.is_dir():
        return any(path.rglob(LABELS_FILE))
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return any(PurePosixPath(n).name == LABELS_FILE for n in archive.namelist())
    return False


def read_lake_runs(path, prep):
    """Lake et al.'s runs in ``path`` (``all_runs.zip`` or its folder) as ``Episode``s, in the
    order of their folder names: the 20 training drawings are the support set (label ``j`` is
    the ``j``-th ``classMM.png`` by name), the test drawings the queries, labelled from
    ``class_labels.txt`` (not from file order). A line that is malformed or names a missing file,
    a test drawing without a line or with two, raise ``ValueError`` naming the file and line."""
    tree, where = _tree(path)
    label_files = sorted(k for k in tree if PurePosixPath(k).name == LABELS_FILE)
    if not label_files:
        raise ValueError(f"{path} holds no {LABELS_FILE}: not Lake et al.'s runs "
                         "(runNN/training, runNN/test, runNN/class_labels.txt)")
    runs = []
    for label_file in label_files:
        run = PurePosixPath(label_file).parent
        training = sorted(k for k in tree if PurePosixPath(k).parent == run / "training"
                          and _is_image(k))
        test = sorted(k for k in tree if PurePosixPath(k).parent == run / "test" and _is_image(k))
        if not training or not test:
            raise ValueError(f"{where(str(run))} needs images in both training/ and test/")
        label_of = {k: j for j, k in enumerate(training)}
        labels = {}
        lines = tree[label_file].decode("utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            fields = line.split()
            at = f"{where(label_file)}, line {number}"
            if len(fields) != 2:
                raise ValueError(f"{at}: expected 'runNN/test/itemMM.png "
                                 f"runNN/training/classKK.png', got {line.strip()!r}")
            # Paths are relative to the folder holding the runs (or, failing that, to the run).
            item, drawing = (_resolve(field, run, tree) for field in fields)
            if item not in test:
                raise ValueError(f"{at}: {fields[0]} is not a drawing in {run}/test/")
            if drawing not in label_of:
                raise ValueError(f"{at}: {fields[1]} is not a drawing in {run}/training/")
            if item in labels:
                raise ValueError(f"{at}: {fields[0]} has a second line")
            labels[item] = label_of[drawing]
        missing = [k for k in test if k not in labels]
        if missing:
            raise ValueError(f"{where(label_file)} has no line for {missing[0]}"
                             + (f" (and {len(missing) - 1} more test drawings)"
                                if len(missing) > 1 else ""))
        runs.append(Episode(
            str(run), _images(tree, training, where, prep),
            np.arange(len(training), dtype=np.int32), _images(tree, test, where, prep),
            np.array([labels[k] for k in test], np.int32),
            [PurePosixPath(k).stem for k in training]))
    return runs


def _resolve(field, run, tree):
    for candidate in (run.parent / field, run / field):
        if str(candidate) in tree:
            return str(candidate)
    return str(run.parent / field)


def read_episodes(path, prep):
    """The episodes of an episode folder or zip (``EPISODE/support/CLASS/*.png``,
    ``EPISODE/query/CLASS/*.png``), in the order of their names. An episode's classes sorted by
    name get labels 0..N-1; a set's images are taken in the order of their file names (then
    class), so episodes written by ``save_episodes`` come back in the order they were sampled.
    Files that are not images are ignored; an image elsewhere, an episode without a support or a
    query set, or a query class without support images raise ``ValueError`` naming them."""
    tree, where = _tree(path)
    found = {}
    for key in sorted(k for k in tree if _is_image(k)):
        parts = PurePosixPath(key).parts
        if len(parts) < 3 or parts[-3] not in SETS:
            raise ValueError(f"{where(key)}: expected EPISODE/support/CLASS/IMAGE or "
                             "EPISODE/query/CLASS/IMAGE")
        episode = "/".join(parts[:-3]) or "."
        found.setdefault(episode, {s: [] for s in SETS})[parts[-3]].append(
            (parts[-1], parts[-2], key))
    if not found:
        raise ValueError(f"{path} holds no images in EPISODE/support/CLASS/ and "
                         "EPISODE/query/CLASS/ folders")
    result = []
    for name in sorted(found):
        sets = found[name]
        for s in SETS:
            if not sets[s]:
                raise ValueError(f"episode {where(name)} has no {s} images")
        classes = sorted({c for _, c, _ in sets["support"]})
        extra = sorted({c for _, c, _ in sets["query"]} - set(classes))
        if extra:
            raise ValueError(f"episode {where(name)}: query class {extra[0]!r} has no support "
                             "images")
        label = {c: j for j, c in enumerate(classes)}
        arrays = []
        for s in SETS:
            items = sorted(sets[s])
            arrays += [_images(tree, [k for _, _, k in items], where, prep),
                       np.array([label[c] for _, c, _ in items], np.int32)]
        result.append(Episode(name, *arrays, classes))
    return result


def read(path, prep):
    """Lake et al.'s runs (``read_lake_runs``) if ``path`` holds a ``class_labels.txt``, else
    episode folders (``read_episodes``)."""
    if not Path(path).exists():
        raise ValueError(f"episodes path {path} does not exist")
    return (read_lake_runs if is_lake(path) else read_episodes)(path, prep)


def _shape(episode):
    return (episode.support_x.shape, episode.query_x.shape, episode.n_way)


def batches(episode_list, meta_batch=25):
    """Meta-batches ``(support_x, support_y, query_x, query_y)`` (images float32 in [0, 1]) of
    consecutive episodes of one shape, at most ``meta_batch`` each, in order."""
    group = []
    for episode in list(episode_list) + [None]:
        if group and (episode is None or len(group) == meta_batch
                      or _shape(episode) != _shape(group[0])):
            yield (np.stack([e.support_x for e in group]).astype(np.float32) / 255.0,
                   np.stack([e.support_y for e in group]),
                   np.stack([e.query_x for e in group]).astype(np.float32) / 255.0,
                   np.stack([e.query_y for e in group]))
            group = []
        if episode is not None:
            group.append(episode)


def score(evaluator, state, episode_list, meta_batch=25):
    """``evaluator(state, batch)``'s per-episode values (``training.make_evaluator``) over the
    episodes, in order: ``{name: array [len(episode_list)]}``."""
    if not episode_list:
        raise ValueError("no episodes to score")
    ways = sorted({e.n_way for e in episode_list})
    if len(ways) > 1:
        raise ValueError(f"the episodes mix {ways}-way episodes; score one way at a time")
    values = {}
    for batch in batches(episode_list, meta_batch):
        for name, v in evaluator(state, batch).items():
            values.setdefault(name, []).append(np.asarray(v))
    return {name: np.concatenate(v) for name, v in values.items()}


def lake_error_rates(accuracies):
    """Per-run error rates in percent and their mean, as Lake et al. report: ``(rates, mean)``."""
    rates = 100.0 * (1.0 - np.asarray(accuracies, np.float64))
    return rates, float(rates.mean())


def save_episodes(out_dir, batch, first_index, prep):
    """Write a meta-batch ``(support_x, support_y, query_x, query_y)`` (float images in [0, 1], as
    samplers give them) as episode folders
    ``out_dir/episodeNNNNN/{support,query}/classLLL/PPPP.png`` numbered from ``first_index``:
    ``LLL`` the label, ``PPPP`` the image's place in its set. Images are stored as the source
    files were before ``prep`` (inverted back when ``prep.invert``), so ``read_episodes(out_dir,
    prep)`` returns the same arrays. Returns the episode names."""
    support_x, support_y, query_x, query_y = (np.asarray(a) for a in batch)
    names = []
    for b in range(support_x.shape[0]):
        name = f"episode{first_index + b:05d}"
        for s, x, y in (("support", support_x[b], support_y[b]), ("query", query_x[b], query_y[b])):
            pixels = np.round(x * 255.0).clip(0, 255).astype(np.uint8)
            if prep.invert:
                pixels = 255 - pixels
            for place, (image, label) in enumerate(zip(pixels, y)):
                folder = Path(out_dir, name, s, f"class{int(label):03d}")
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{place:04d}.png").write_bytes(tf.io.encode_png(image).numpy())
        names.append(name)
    return names
