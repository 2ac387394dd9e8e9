"""Data sources: real Omniglot small zips, generated folders/zips/npz, TFDS mocks, splits, sinusoids."""

import dataclasses
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from functional_meta import data

OMNIGLOT = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'omniglot'
SMALL = ['images_background_small1.zip', 'images_background_small2.zip']


def _png(array):
    return tf.io.encode_png(tf.constant(array, tf.uint8)).numpy()


def _stroke_image(seed, size=105):
    """White background, one black square: like an Omniglot drawing."""
    image = np.full((size, size, 1), 255, np.uint8)
    r = np.random.default_rng(seed).integers(0, size - 30)
    image[r:r + 30, r:r + 30] = 0
    return image


# ---------------------------------------------------------------- real Omniglot small zips

@pytest.fixture(scope='module')
def small_zips():
    if not all((OMNIGLOT / name).is_file() for name in SMALL):
        pytest.skip(f"Omniglot small zips not found in {OMNIGLOT}")
    return [OMNIGLOT / name for name in SMALL]


@pytest.fixture(scope='module')
def omniglot_small(small_zips):
    return data.omniglot_zip(small_zips)


def test_real_small_zips_have_242_characters_of_20_drawings(omniglot_small):
    d = omniglot_small
    assert len(d) == 242 and len(set(d.names)) == 242
    assert all(x.shape == (20, 28, 28, 1) and x.dtype == np.uint8 for x in d.images)
    assert sorted(set(d.groups)) == ['Balinese', 'Early_Aramaic', 'Greek', 'Japanese_(katakana)',
                                     'Korean', 'Latin', 'Sanskrit', 'Tagalog']
    assert all(n.startswith(g + '/character') for n, g in zip(d.names, d.groups))
    assert sum(g == 'Greek' for g in d.groups) == 24 and sum(g == 'Latin' for g in d.groups) == 26


def test_real_small_zips_are_inverted(omniglot_small):
    images = np.stack(omniglot_small.images).astype(np.float32) / 255.0
    assert images.max() == 1.0 and images.min() == 0.0
    assert images.mean() < 0.2                      # background 0, strokes bright
    assert np.median(images[..., 0, 0, 0]) == 0.0   # corners are background


def test_real_small_zips_counted_per_zip(small_zips):
    first, second = (data.omniglot_zip(path) for path in small_zips)
    assert (len(first), len(second)) == (136, 156)
    assert len(set(first.groups)) == len(set(second.groups)) == 5
    assert len(set(first.names) | set(second.names)) == 242


def test_real_small_zip_rotations_quadruple_classes(small_zips, omniglot_small):
    rotated = data.omniglot_zip(small_zips[0], rotations=True)
    assert len(rotated) == 4 * 136
    i = rotated.names.index('Greek/character01/rot90')
    base = rotated.images[rotated.names.index('Greek/character01')]
    np.testing.assert_array_equal(rotated.images[i], np.rot90(base, 1, axes=(1, 2)))
    assert rotated.groups[i] == 'Greek'
    np.testing.assert_array_equal(base, omniglot_small.images[omniglot_small.names.index(
        'Greek/character01')])


# ---------------------------------------------------------------- generated Omniglot layouts

def _write_omniglot(root, top, alphabets, per_class=3):
    for alphabet, characters in alphabets.items():
        for c in range(1, characters + 1):
            folder = root / top / alphabet / f'character{c:02d}'
            folder.mkdir(parents=True)
            for j in range(per_class):
                (folder / f'{c:04d}_{j + 1:02d}.png').write_bytes(_png(_stroke_image(c * 10 + j)))


def _zip_folder(folder, path):
    with zipfile.ZipFile(path, 'w') as archive:
        for file in sorted(folder.rglob('*')):
            archive.write(file, file.relative_to(folder.parent).as_posix())
    return path


def test_omniglot_folder_and_zip_agree_and_dedupe(tmp_path):
    _write_omniglot(tmp_path, 'small1', {'Greek': 2, 'Atlantean': 1})
    _write_omniglot(tmp_path, 'small2', {'Greek': 2, 'Braille': 3})
    from_folders = data.omniglot_zip([tmp_path / 'small1', tmp_path / 'small2'], image_size=14)
    zips = [_zip_folder(tmp_path / n, tmp_path / f'{n}.zip') for n in ('small1', 'small2')]
    from_zips = data.omniglot_zip(zips, image_size=14)
    assert from_folders.names == from_zips.names == [
        'Atlantean/character01', 'Braille/character01', 'Braille/character02',
        'Braille/character03', 'Greek/character01', 'Greek/character02']
    assert from_zips.groups[0] == 'Atlantean' and from_zips.groups[-1] == 'Greek'
    for a, b in zip(from_folders.images, from_zips.images):
        assert a.shape == (3, 14, 14, 1)
        np.testing.assert_array_equal(a, b)
    expected = tf.image.resize(255.0 - _stroke_image(10).astype(np.float32), [14, 14], 'area')
    np.testing.assert_allclose(from_zips.images[4][0, ..., 0], np.round(expected[..., 0]), atol=1)


def test_omniglot_damaged_zips_are_named(tmp_path):
    """A member whose bytes changed names the member; a truncated zip is 'damaged'."""
    _write_omniglot(tmp_path, 'small1', {'Greek': 2})
    path = _zip_folder(tmp_path / 'small1', tmp_path / 'small1.zip')
    good = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        member = archive.infolist()[-1]
    start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    corrupt = bytearray(good)
    corrupt[start + member.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match=f'small1.zip is damaged: member {member.filename} '):
        data.omniglot_zip(path)
    path.write_bytes(good[:len(good) // 2])
    with pytest.raises(ValueError, match='small1.zip is damaged') as caught:
        data.load('omniglot', str(path))
    assert 'not a zip' not in str(caught.value)

def test_omniglot_bad_path(tmp_path):
    with pytest.raises(ValueError, match='nothing'):
        data.omniglot_zip(tmp_path / 'nothing.zip')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='empty'):
        data.omniglot_zip(tmp_path / 'empty')


# ---------------------------------------------------------------- image folders

def _write_folder(root, classes, per_class=2, shape=(8, 6, 3)):
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            image = np.full(shape, 10 * j + 20 * len(c), np.uint8)
            (root / c / f'{j}.png').write_bytes(_png(image))


def test_image_folder_flat_layout(tmp_path):
    _write_folder(tmp_path, ['cat', 'dog', 'emu'], per_class=3)
    d = data.image_folder(tmp_path)
    assert d.names == ['cat', 'dog', 'emu'] and d.groups == d.names
    assert all(x.shape == (3, 8, 6, 3) for x in d.images)
    assert d.images[0][1, 0, 0, 0] == 10 + 60
    gray = data.image_folder(tmp_path, image_size=4, grayscale=True, invert=True)
    assert all(x.shape == (3, 4, 4, 1) for x in gray.images)
    assert gray.images[0][0, 0, 0, 0] == 255 - 60


def test_image_folder_grouped_layout(tmp_path):
    _write_folder(tmp_path, ['land/cat', 'land/dog', 'sea/eel'])
    d = data.image_folder(tmp_path)
    assert d.names == ['land/cat', 'land/dog', 'sea/eel']
    assert d.groups == ['land', 'land', 'sea']


def test_image_folder_corrupt_image_names_the_file(tmp_path):
    _write_folder(tmp_path, ['a', 'b'])
    (tmp_path / 'b' / 'broken.png').write_bytes(b'not a png at all')
    with pytest.raises(ValueError, match='broken.png'):
        data.image_folder(tmp_path)


def test_image_folder_mixed_sizes_need_image_size(tmp_path, caplog):
    """Mixed sizes: an error naming a file without image_size, one warning with it."""
    _write_folder(tmp_path, ['a', 'b'])
    (tmp_path / 'b' / 'big.png').write_bytes(_png(np.zeros((9, 9, 3), np.uint8)))
    with pytest.raises(ValueError, match='big.png'):
        data.image_folder(tmp_path)
    with caplog.at_level('INFO', logger='absl'):
        assert data.image_folder(tmp_path, image_size=5).images[1].shape == (3, 5, 5, 3)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    assert len(warnings) == 1, warnings
    assert 'mixes 2 image sizes: resized 5 of its 5 images (4 of 8x6, 1 of 9x9) to 5x5' \
        in warnings[0]
    caplog.clear()
    _write_folder(tmp_path / 'same', ['a', 'b'])
    with caplog.at_level('INFO', logger='absl'):
        data.image_folder(tmp_path / 'same', image_size=5)
    assert [r.levelname for r in caplog.records] == ['INFO']
    assert 'resized its 4 images (4 of 8x6) to 5x5' in caplog.records[0].getMessage()


def test_image_folder_empty_or_missing(tmp_path):
    with pytest.raises(ValueError, match='missing'):
        data.image_folder(tmp_path / 'missing')
    (tmp_path / 'hollow' / 'class').mkdir(parents=True)
    with pytest.raises(ValueError, match='hollow'):
        data.image_folder(tmp_path / 'hollow')


# ---------------------------------------------------------------- MNIST and TFDS

def test_mnist_npz(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f'x_{s}': rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
              for s, n in (('train', 50), ('test', 20))}
    arrays['y_train'] = np.arange(50) % 10
    arrays['y_test'] = np.arange(20) % 10
    np.savez(tmp_path / 'mnist.npz', **arrays)
    train = data.mnist_npz(tmp_path / 'mnist.npz')
    test = data.mnist_npz(tmp_path / 'mnist.npz', split='test')
    assert train.names == [str(i) for i in range(10)]
    assert [len(x) for x in train.images] == [5] * 10 and [len(x) for x in test.images] == [2] * 10
    assert train.images[3].shape == (5, 28, 28, 1)
    np.testing.assert_array_equal(train.images[3][1, ..., 0], arrays['x_train'][13])
    with pytest.raises(ValueError, match='split'):
        data.mnist_npz(tmp_path / 'mnist.npz', split='validation')


def _fake_omniglot(self, split, **kwargs):
    """12 drawings of 3 characters (labels 5, 6, 7) from 2 alphabets."""
    del self, split, kwargs
    n = 12
    images = np.stack([np.repeat(_stroke_image(i), 3, -1) for i in range(n)])
    labels = np.arange(n) % 3 + 5
    return tf.data.Dataset.from_tensor_slices({
        'image': images, 'label': labels, 'alphabet': (labels == 7).astype(np.int64),
        'alphabet_char_id': labels - 5})


def test_omniglot_tfds_groups_by_label():
    with tfds.testing.mock_data(as_dataset_fn=_fake_omniglot):
        d = data.omniglot_tfds('train', image_size=20)
        rotated = data.omniglot_tfds('small1', rotations=True)
    assert len(d) == 3 and [len(x) for x in d.images] == [4, 4, 4]
    assert d.names == ['0/character01', '0/character02', '1/character03']
    assert d.groups == ['0', '0', '1']
    assert d.images[0].shape == (4, 20, 20, 1)
    assert d.images[0][0, 0, 0, 0] == 0 and d.images[0].max() == 255   # inverted
    assert len(rotated) == 12 and rotated.names[1] == '0/character01/rot90'


def test_mnist_tfds_mock():
    with tfds.testing.mock_data(num_examples=30):
        d = data.mnist_tfds('test')
    assert sum(len(x) for x in d.images) == 30
    assert set(d.names) <= {str(i) for i in range(10)}
    assert all(x.shape[1:] == (28, 28, 1) and x.dtype == np.uint8 for x in d.images)


# ---------------------------------------------------------------- synthetic, splits, selection

def test_synthetic_is_learnable_and_seeded():
    d = data.synthetic(5, 7, (4, 4, 2), seed=3)
    assert len(d) == 5 and all(x.shape == (7, 4, 4, 2) and x.dtype == np.uint8 for x in d.images)
    means = np.stack([x.mean(0) for x in d.images])
    assert np.abs(means[0] - means[1]).mean() > 20            # classes differ
    np.testing.assert_array_equal(d.images[2], data.synthetic(5, 7, (4, 4, 2), seed=3).images[2])


def _grouped(groups=6, per_group=4):
    d = data.synthetic(groups * per_group, 2, (2, 2, 1))
    return dataclasses.replace(d, groups=[f'g{i // per_group}' for i in range(len(d))])


def test_split_by_group_never_overlaps_and_is_seeded():
    d = _grouped()
    a, b, c = data.split_classes(d, [0.5, 1 / 3, 1 / 6], seed=4)
    assert len(a) + len(b) + len(c) == len(d)
    for s, t in [(a, b), (a, c), (b, c)]:
        assert not set(s.names) & set(t.names) and not set(s.groups) & set(t.groups)
    assert (len(set(a.groups)), len(set(b.groups)), len(set(c.groups))) == (3, 2, 1)
    again = data.split_classes(d, [0.5, 1 / 3, 1 / 6], seed=4)
    assert [s.names for s in again] == [a.names, b.names, c.names]
    others = [data.split_classes(d, [0.5, 0.5], seed=s)[0].names for s in range(6)]
    assert len({tuple(o) for o in others}) > 1


def test_split_by_class_with_counts_keeps_rotations_together():
    d = data._with_rotations(data.synthetic(10, 2, (3, 3, 1)))
    train, test = data.split_classes(d, [7, 2], seed=0, by_group=False)
    assert (len(train), len(test)) == (28, 8)
    base = [{data._base_name(n) for n in s.names} for s in (train, test)]
    assert not base[0] & base[1] and len(base[0]) == 7


def test_split_bad_sizes():
    d = _grouped()
    with pytest.raises(ValueError, match='sizes'):
        data.split_classes(d, [4, 3])               # 6 groups only
    with pytest.raises(ValueError, match='sizes'):
        data.split_classes(d, [0.8, 0.3])


def test_select_and_exclude_groups():
    d = _grouped()
    chosen = data.select_groups(d, ['g1', 'g4'])
    rest = data.exclude_groups(d, ['g1', 'g4'])
    assert set(chosen.groups) == {'g1', 'g4'} and len(chosen) == 8
    assert not set(rest.groups) & {'g1', 'g4'} and len(rest) == 16
    with pytest.raises(ValueError, match='Klingon'):
        data.select_groups(d, ['Klingon'])


# ---------------------------------------------------------------- sinusoids

def test_sinusoid_tasks_ranges_and_function():
    t = data.sinusoid_tasks(64, 10, 15, rng=0)
    assert t.support_x.shape == t.support_y.shape == (64, 10, 1)
    assert t.query_x.shape == t.query_y.shape == (64, 15, 1)
    assert all(a.dtype == np.float32 for a in t)
    assert 0.1 <= t.amplitude.min() and t.amplitude.max() <= 5.0 and t.amplitude.std() > 0.5
    assert 0.0 <= t.phase.min() and t.phase.max() <= math.pi
    x = np.concatenate([t.support_x, t.query_x], 1)
    assert -5.0 <= x.min() and x.max() <= 5.0 and x.max() - x.min() > 9
    expected = t.amplitude[:, None, None] * np.sin(t.query_x - t.phase[:, None, None])
    np.testing.assert_allclose(t.query_y, expected, atol=1e-5)
    np.testing.assert_array_equal(data.sinusoid_tasks(64, 10, 15, rng=0).query_y, t.query_y)
