"""Episode sampler invariants, determinism, resume, static-shape tf.data pipelines, bad requests."""

import json

import numpy as np
import pytest

from functional_meta import data, episodes


def _indexed(num_classes=12, per_class=9, smallest=None):
    """Class data whose every image spells out (class, image index) in its two pixels."""
    sizes = [per_class] * num_classes
    if smallest is not None:
        sizes[-1] = smallest
    images = [np.stack([np.array([c, i], np.uint8).reshape(2, 1, 1) for i in range(n)])
              for c, n in enumerate(sizes)]
    names = [f'c{c}' for c in range(num_classes)]
    return data.ClassData(images, names, names)


def _ids(x):
    """(class, image) pairs of float images made by ``_indexed``: array [..., 2]."""
    return np.round(x[..., 0] * 255).astype(int).reshape(x.shape[:-3] + (2,))


def test_episode_invariants():
    n, k, q, b = 5, 3, 4, 6
    sampler = episodes.EpisodeSampler(_indexed(), n, k, q, meta_batch=b, seed=1)
    sx, sy, qx, qy = sampler.sample()
    assert sx.shape == (b, n * k, 2, 1, 1) and qx.shape == (b, n * q, 2, 1, 1)
    assert sy.shape == (b, n * k) and qy.shape == (b, n * q)
    assert sx.dtype == qx.dtype == np.float32 and sy.dtype == qy.dtype == np.int32
    assert 0.0 <= sx.min() and sx.max() <= 1.0
    ordered = 0
    for e in range(b):
        assert np.array_equal(np.bincount(sy[e], minlength=n), [k] * n)
        assert np.array_equal(np.bincount(qy[e], minlength=n), [q] * n)
        support, query = _ids(sx[e]), _ids(qx[e])
        support_set = {tuple(p) for p in support}
        assert len(support_set) == n * k and len({tuple(p) for p in query}) == n * q
        assert not support_set & {tuple(p) for p in query}     # no image in both sets
        classes = []
        for label in range(n):                                 # one class per label, both sets
            cls = set(support[sy[e] == label][:, 0]) | set(query[qy[e] == label][:, 0])
            assert len(cls) == 1
            classes += cls
        assert len(set(classes)) == n
        ordered += np.array_equal(sy[e], np.sort(sy[e]))
    assert ordered < b                                          # shuffled within episodes


def test_labels_are_assigned_at_random():
    sampler = episodes.EpisodeSampler(_indexed(num_classes=3), 3, 1, 1, meta_batch=30, seed=0)
    sx, sy, _, _ = sampler.sample()
    label_of_class0 = [sy[e][_ids(sx[e])[:, 0] == 0][0] for e in range(30)]
    assert set(label_of_class0) == {0, 1, 2}


def test_same_seed_same_batches_and_resume():
    d = _indexed()
    a = episodes.EpisodeSampler(d, 4, 2, 3, meta_batch=2, seed=7)
    b = episodes.EpisodeSampler(d, 4, 2, 3, meta_batch=2, seed=7)
    other = episodes.EpisodeSampler(d, 4, 2, 3, meta_batch=2, seed=8)
    first = [a.sample() for _ in range(3)]
    for batch in first:
        for x, y in zip(batch, b.sample()):
            np.testing.assert_array_equal(x, y)
    assert not np.array_equal(first[0][0], other.sample()[0])
    assert not np.array_equal(first[0][0], first[1][0])         # batches differ
    state = json.loads(json.dumps(a.get_state()))
    continued = [a.sample() for _ in range(2)]
    resumed = episodes.EpisodeSampler(d, 4, 2, 3, meta_batch=2, seed=7)
    resumed.set_state(state)
    for batch, again in zip(continued, [resumed.sample() for _ in range(2)]):
        for x, y in zip(batch, again):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match='seed'):
        other.set_state(state)


def test_dataset_static_shapes_and_exact_resume_with_prefetch():
    sampler = episodes.EpisodeSampler(_indexed(), 5, 1, 2, meta_batch=3, seed=2)
    ds = episodes.dataset(sampler, prefetch=4)
    for spec in ds.element_spec:
        assert spec.shape.is_fully_defined()
    assert [s.shape.as_list() for s in ds.element_spec] == [[3, 5, 2, 1, 1], [3, 5],
                                                             [3, 10, 2, 1, 1], [3, 10]]
    consumed = [tuple(t.numpy() for t in batch) for batch in ds.take(4)]
    assert sampler.get_state()['next_batch'] == 0       # the pipeline never moves the sampler
    for i, batch in enumerate(consumed):
        for x, y in zip(batch, sampler.batch(i)):
            np.testing.assert_array_equal(x, y)
    resumed = next(iter(episodes.dataset(sampler, start_batch=2, num_batches=1)))
    for x, y in zip(resumed, consumed[2]):
        np.testing.assert_array_equal(x.numpy(), y)
    assert len(list(episodes.dataset(sampler, start_batch=5, num_batches=3))) == 3


def test_dataset_starts_at_sampler_state():
    sampler = episodes.EpisodeSampler(_indexed(), 2, 1, 1, seed=3)
    sampler.set_state({'seed': 3, 'next_batch': 10})
    first = next(iter(episodes.dataset(sampler)))
    np.testing.assert_array_equal(first[0].numpy(), sampler.batch(10)[0])


@pytest.mark.parametrize('kwargs, match', [
    (dict(n_way=30), r'n_way=30 but the data has 12 classes'),
    (dict(n_way=0), 'n_way'),
    (dict(k_shot=0), 'k_shot'),
    (dict(q_query=-1), 'q_query'),
    (dict(meta_batch=0), 'meta_batch'),
    (dict(k_shot=2.5), 'k_shot'),
    (dict(seed=-1), 'seed'),
    (dict(k_shot=5, q_query=5), r"k_shot \+ q_query.*smallest class, 'c11', has 6"),
])
def test_bad_requests(kwargs, match):
    args = {**dict(n_way=5, k_shot=1, q_query=1, meta_batch=2, seed=0), **kwargs}
    with pytest.raises(ValueError, match=match):
        episodes.EpisodeSampler(_indexed(smallest=6), **args)


def test_mixed_image_shapes_rejected():
    d = data.synthetic(3, 4, (2, 2, 1))
    d = data.ClassData(d.images[:2] + [np.zeros((4, 3, 3, 1), np.uint8)], d.names, d.groups)
    with pytest.raises(ValueError, match='shape'):
        episodes.EpisodeSampler(d, 2, 1, 1)


def test_sinusoid_dataset():
    ds = episodes.sinusoid_dataset(4, 5, 7, seed=1)
    assert [s.shape.as_list() for s in ds.element_spec] == [[4, 5, 1], [4, 5, 1], [4, 7, 1],
                                                             [4, 7, 1]]
    batches = [tuple(t.numpy() for t in b) for b in ds.take(3)]
    assert not np.array_equal(batches[0][0], batches[1][0])
    again = next(iter(episodes.sinusoid_dataset(4, 5, 7, seed=1, start_batch=2)))
    np.testing.assert_array_equal(again[3].numpy(), batches[2][3])
    assert np.abs(batches[0][1]).max() <= 5.0 and np.abs(batches[0][0]).max() <= 5.0
    with pytest.raises(ValueError, match='k_query'):
        episodes.sinusoid_dataset(4, 5, 0)


# ---------------------------------------------------------------------------------------------
# Training-time augmentation: random shifts


def test_shift_images_moves_each_image_by_its_drawn_offset_with_zero_fill():
    images = np.zeros((6, 9, 9, 1), np.uint8)
    images[:, 4, 4, 0] = 200                                   # one bright pixel in the middle
    images[:, 3, 5, 0] = 100                                   # and a second one beside it
    out = episodes.shift_images(images, 2, np.random.default_rng(11))
    dy, dx = np.random.default_rng(11).integers(-2, 3, size=(2, 6))
    assert out.shape == images.shape and out.dtype == images.dtype
    for n in range(6):
        expected = np.zeros((9, 9, 1), np.uint8)
        expected[4 + dy[n], 4 + dx[n], 0] = 200
        expected[3 + dy[n], 5 + dx[n], 0] = 100
        np.testing.assert_array_equal(out[n], expected)
    assert (dy != 0).any() and (dx != 0).any()
    # Uncovered pixels are zero, not wrapped around: a full image keeps |dy| rows and |dx|
    # columns empty.
    full = np.full((40, 7, 7, 1), 255, np.uint8)
    shifted = episodes.shift_images(full, 3, np.random.default_rng(2))
    dy, dx = np.abs(np.random.default_rng(2).integers(-3, 4, size=(2, 40)))
    np.testing.assert_array_equal((shifted == 0).sum(axis=(1, 2, 3)), 7 * dy + 7 * dx - dy * dx)


def _centred(num_classes=6, per_class=4, size=10, margin=2, seed=0):
    """Random images whose content keeps ``margin`` empty pixels on every side."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(num_classes):
        x = np.zeros((per_class, size, size, 1), np.uint8)
        x[:, margin:size - margin, margin:size - margin] = rng.integers(
            1, 256, (per_class, size - 2 * margin, size - 2 * margin, 1))
        images.append(x)
    names = [f'c{c}' for c in range(num_classes)]
    return data.ClassData(images, names, names)


def test_augmented_batches_are_shifted_copies_of_the_same_episodes():
    d = _centred()
    plain = episodes.EpisodeSampler(d, 3, 1, 2, meta_batch=4, seed=5)
    assert plain.augment_shift == 0                             # off by default
    shifted = episodes.EpisodeSampler(d, 3, 1, 2, meta_batch=4, seed=5, augment_shift=2)
    moved = 0
    for index in (0, 7):
        a, b = plain.batch(index), shifted.batch(index)
        assert [x.shape for x in a] == [x.shape for x in b]
        assert [x.dtype for x in a] == [x.dtype for x in b]
        np.testing.assert_array_equal(a[1], b[1])               # same episodes, same labels
        np.testing.assert_array_equal(a[3], b[3])
        for x, y in ((a[0], b[0]), (a[2], b[2])):
            for original, augmented in zip(x.reshape((-1,) + x.shape[2:]),
                                           y.reshape((-1,) + y.shape[2:])):
                offsets = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                           if np.array_equal(np.roll(original, (dy, dx), axis=(0, 1)), augmented)]
                assert offsets, "an augmented image is not a shift of its original"
                moved += offsets != [(0, 0)]
    assert moved > 10                                           # most images really move


def test_augmented_batches_are_a_pure_function_of_seed_and_index():
    d = _centred()
    a = episodes.EpisodeSampler(d, 3, 1, 2, meta_batch=2, seed=5, augment_shift=1)
    b = episodes.EpisodeSampler(d, 3, 1, 2, meta_batch=2, seed=5, augment_shift=1)
    other = episodes.EpisodeSampler(d, 3, 1, 2, meta_batch=2, seed=6, augment_shift=1)
    for x, y in zip(a.batch(3), b.batch(3)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.batch(3)[0], other.batch(3)[0])
    assert not np.array_equal(a.batch(3)[0], a.batch(4)[0])
    # A pipeline started at batch 2 (a resume) gives the batches of an uninterrupted one.
    whole = [tuple(t.numpy() for t in batch) for batch in episodes.dataset(a, num_batches=4)]
    resumed = [tuple(t.numpy() for t in batch)
               for batch in episodes.dataset(b, start_batch=2, num_batches=2)]
    for batch, again in zip(whole[2:], resumed):
        for x, y in zip(batch, again):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize('shift, match', [
    (-1, 'augment_shift must be a non-negative integer'),
    (1.5, 'augment_shift must be a non-negative integer'),
    (True, 'augment_shift must be a non-negative integer'),
    (10, r'augment_shift=10 must be smaller than the images \(10x10\)'),
])
def test_bad_augment_shift(shift, match):
    with pytest.raises(ValueError, match=match):
        episodes.EpisodeSampler(_centred(), 3, 1, 1, augment_shift=shift)


def test_warp_identity_quarter_turn_and_scale():
    x = np.random.default_rng(0).integers(0, 256, (3, 12, 12, 1)).astype(np.uint8)
    np.testing.assert_array_equal(episodes.warp(x, [0] * 3, [1] * 3), x)
    # A quarter turn counter-clockwise is numpy's rot90 (exact on the pixel grid; the border
    # rows come out the same too, since the centre is a pixel corner for an even size).
    np.testing.assert_array_equal(episodes.warp(x, [90] * 3, [1] * 3), np.rot90(x, axes=(1, 2)))
    full = np.full((2, 20, 20, 1), 255, np.uint8)
    shrunk = episodes.warp(full, [0, 0], [0.5, 0.5])
    assert shrunk[0, 10, 10, 0] == 255 and shrunk[0, 1, 1, 0] == 0       # zero outside
    assert shrunk.mean() / 255 == pytest.approx(0.25, abs=0.03)           # a quarter of the area
    assert episodes.warp(full, [0], [2.0]).min() == 255                   # enlarged: all covered


def test_rotated_and_scaled_batches_keep_the_episodes_and_are_deterministic():
    d = _centred()
    options = dict(augment_rotate=20.0, augment_scale=0.2)
    plain = episodes.EpisodeSampler(d, 3, 1, 2, meta_batch=2, seed=5)
    warped = episodes.EpisodeSampler(d, 3, 1, 2, meta_batch=2, seed=5, **options)
    again = episodes.EpisodeSampler(d, 3, 1, 2, meta_batch=2, seed=5, **options)
    a, b, c = plain.batch(3), warped.batch(3), again.batch(3)
    for x, y in zip(b, c):
        np.testing.assert_array_equal(x, y)                     # a pure function of (seed, i)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[3], b[3])
    assert [x.shape for x in a] == [x.shape for x in b] and b[0].dtype == np.float32
    changed = np.abs(a[0] - b[0]).reshape(len(a[0]) * a[0].shape[1], -1).max(axis=1)
    assert (changed > 0.05).all()                               # every image is transformed
    assert not np.array_equal(b[0], warped.batch(4)[0])


@pytest.mark.parametrize('options, match', [
    (dict(augment_rotate=-1.0), r'augment_rotate must be a number in \[0, 180\)'),
    (dict(augment_rotate=180), r'augment_rotate must be a number in \[0, 180\)'),
    (dict(augment_scale=1.0), r'augment_scale must be a number in \[0, 1\)'),
    (dict(augment_scale='0.1'), 'augment_scale'),
])
def test_bad_warp_settings(options, match):
    with pytest.raises(ValueError, match=match):
        episodes.EpisodeSampler(_centred(), 3, 1, 1, **options)
