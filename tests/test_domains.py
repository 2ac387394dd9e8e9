"""Domains: each style against a hand-made reference on small arrays, names that round-trip, clear
errors, determinism, and samplers that keep each episode (or minibatch) within one domain."""

import numpy as np
import pytest

from functional_meta import data, domains, episodes


def one_image(values):
    """A 2-D list -> uint8 ``[1, H, W, 1]``."""
    return np.asarray(values, np.uint8)[None, :, :, None]


def test_rotate_by_90_degrees_is_numpy_rot90_and_by_0_the_identity():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(3, 6, 6, 1), dtype=np.uint8)
    # Counter-clockwise as displayed (row 0 at the top), like numpy.rot90 over (H, W).
    np.testing.assert_array_equal(domains.transform(x, "rotate:90"), np.rot90(x, 1, axes=(1, 2)))
    np.testing.assert_array_equal(domains.transform(x, "rotate:-90"), np.rot90(x, -1, axes=(1, 2)))
    np.testing.assert_array_equal(domains.transform(x, "rotate:0"), x)
    # By hand, a 45-degree turn of a 3x3 image: the top-left corner reads the input at row
    # 1 - sqrt(2), column 1, between the zero outside and the top-middle pixel (bilinear).
    y = one_image([[0, 200, 0], [0, 0, 0], [0, 0, 0]])
    turned = domains.transform(y, "rotate:45")[0, :, :, 0]
    assert turned[0, 0] == round(200 * (2 - np.sqrt(2))) and turned[1, 1] == 0
    assert turned[0, 2] == 0 and turned[2, 0] == 0


def test_dilation_of_a_single_pixel_is_a_square_and_erosion_removes_it():
    x = np.zeros((1, 7, 7, 1), np.uint8)
    x[0, 3, 3] = 180
    expected = np.zeros_like(x)
    expected[0, 2:5, 2:5] = 180
    np.testing.assert_array_equal(domains.transform(x, "dilate:1"), expected)
    expected[0, 1:6, 1:6] = 180
    np.testing.assert_array_equal(domains.transform(x, "dilate:2"), expected)
    np.testing.assert_array_equal(domains.transform(x, "erode:1"), np.zeros_like(x))
    # Erosion keeps a 3x3 block's centre only, and the image's border does not erode it.
    block = np.zeros((1, 5, 5, 1), np.uint8)
    block[0, 1:4, 1:4] = 90
    centre = np.zeros_like(block)
    centre[0, 2, 2] = 90
    np.testing.assert_array_equal(domains.transform(block, "erode:1"), centre)
    full = np.full((1, 4, 4, 1), 77, np.uint8)
    np.testing.assert_array_equal(domains.transform(full, "erode:1"), full)


def test_inversion_and_blur_of_an_impulse():
    x = np.arange(0, 250, 10, dtype=np.uint8).reshape(1, 5, 5, 1)
    np.testing.assert_array_equal(domains.transform(x, "invert"), 255 - x)
    impulse = np.zeros((1, 9, 9, 1), np.uint8)
    impulse[0, 4, 4] = 255
    sigma = 1.0
    g = np.exp(-0.5 * np.arange(-3, 4) ** 2 / sigma ** 2)
    g /= g.sum()
    expected = np.zeros((9, 9))
    expected[1:8, 1:8] = 255 * np.outer(g, g)
    blurred = domains.transform(impulse, "blur:1")[0, :, :, 0]
    np.testing.assert_array_equal(blurred, np.round(expected).astype(np.uint8))
    assert blurred[4, 4] == round(255 * g[3] ** 2) and blurred.sum() > 0.95 * 255


def test_noise_and_elastic_are_deterministic_per_name_seed_and_class():
    classes = data.synthetic(4, 6, (10, 10, 1), seed=1)
    for name in ("noise:0.3", "elastic:34:4", "rotate:30+noise:0.1"):
        a, b = domains.apply(classes, name), domains.apply(classes, name)
        for x, y in zip(a.images, b.images):
            np.testing.assert_array_equal(x, y)
        other = domains.apply(classes, name, seed=1)
        assert any((x != y).any() for x, y in zip(a.images, other.images))
        # A class's images do not depend on which other classes are loaded.
        part = domains.apply(data.subset(classes, [2, 0]), name)
        np.testing.assert_array_equal(part.images[0], a.images[2])
        assert a.names == classes.names and a.groups == classes.groups
    noisy = domains.apply(classes, "noise:0.3").images[0].astype(float)
    clean = classes.images[0].astype(float)
    assert 0.2 * 255 < np.std(noisy - clean) < 0.3 * 255      # clipping only shrinks it
    with pytest.raises(ValueError, match="rng"):
        domains.transform(classes.images[0], "noise:0.3")
    assert domains.apply(classes, "clean") is classes


def test_elastic_with_a_tiny_alpha_barely_moves_and_a_large_one_does():
    classes = data.synthetic(2, 4, (16, 16, 1), seed=2)
    small = domains.apply(classes, "elastic:0.01:3").images[0].astype(int)
    large = domains.apply(classes, "elastic:400:3").images[0].astype(int)
    original = classes.images[0].astype(int)
    assert np.abs(small - original).max() <= 2
    assert np.abs(large - original).mean() > 10


@pytest.mark.parametrize("name", ["clean", "invert", "rotate:45", "rotate:-7.5", "dilate:1",
                                  "erode:2", "blur:1.5", "noise:0.3", "elastic:34:4",
                                  "rotate:30+blur:1", "rotate:1e-05"])
def test_canonical_names_round_trip(name):
    styles = domains.parse(name)
    assert domains.format_name(styles) == name
    assert domains.parse(domains.format_name(styles)) == styles


def test_other_spellings_map_to_the_canonical_name():
    assert domains.canonical(" rotate:45.0") == "rotate:45"
    assert domains.canonical("blur:1.50+invert") == "blur:1.5+invert"
    assert domains.parse_list("clean,rotate:15.0") == ["clean", "rotate:15"]
    assert domains.ROTATED_MNIST[-1] == "rotate:75"


@pytest.mark.parametrize("name, says", [
    ("rot:45", "unknown style 'rot'"), ("rotate", "rotate:DEGREES"), ("blur:0", "sigma"),
    ("dilate:1.5", "an integer"), ("noise:2", "in (0, 1]"), ("elastic:34", "ELASTIC"),
    ("rotate:nan", "in [-360, 360]"), ("clean+blur:1", "cannot be combined"), ("", "non-empty")])
def test_bad_names_fail_naming_the_allowed_forms(name, says):
    with pytest.raises(ValueError) as error:
        domains.parse(name)
    assert says.lower() in str(error.value).lower()
    if "combined" not in says:
        assert "allowed forms" in str(error.value) and "blur:SIGMA" in str(error.value)
    with pytest.raises(ValueError, match="more than once"):
        domains.parse_list("clean,rotate:45,rotate:45.0")


def test_partition_gives_disjoint_images_of_every_class():
    classes = data.synthetic(3, 10, (4, 4, 1), seed=0)
    parts = domains.partition(classes, 3, seed=5)
    for c in range(3):
        pieces = [p.images[c] for p in parts]
        assert sorted(len(p) for p in pieces) == [3, 3, 4]
        rows = np.concatenate(pieces).reshape(10, -1)
        assert len({r.tobytes() for r in rows}) == 10           # all images, each once
    with pytest.raises(ValueError, match="fewer than"):
        domains.partition(classes, 11)


def test_each_episode_lies_within_one_domain_and_batches_are_pure():
    classes = data.synthetic(6, 5, (6, 6, 1), seed=3)
    names = ["clean", "invert", "rotate:90"]
    sampler = domains.DomainEpisodeSampler(classes, names, n_way=3, k_shot=1, q_query=2,
                                           meta_batch=8, seed=4)
    styled = [np.concatenate(domains.apply(classes, n).images).reshape(-1, 36) for n in names]
    pools = [{r.tobytes() for r in (s.astype(np.float32) / 255).reshape(-1, 36)} for s in styled]
    for index in (0, 5):
        support_x, support_y, query_x, query_y = sampler.batch(index)
        assert support_x.shape == (8, 3, 6, 6, 1) and query_y.shape == (8, 6)
        which = sampler.domains_of(index)
        for j, d in enumerate(which):
            images = np.concatenate([support_x[j], query_x[j]]).reshape(-1, 36)
            assert all(r.tobytes() in pools[d] for r in images), (index, j, names[d])
        again = sampler.batch(index)
        for a, b in zip(again, (support_x, support_y, query_x, query_y)):
            np.testing.assert_array_equal(a, b)
    seen = np.concatenate([sampler.domains_of(i) for i in range(20)])
    assert set(seen) == {0, 1, 2}
    shapes = [tuple(s.shape) for s in sampler.signature()]
    assert shapes == [(8, 3, 6, 6, 1), (8, 3), (8, 6, 6, 6, 1), (8, 6)]
    first = next(iter(episodes.dataset(sampler, num_batches=1)))
    np.testing.assert_array_equal(first[0].numpy(), sampler.batch(0)[0])


def test_domain_batches_hold_one_minibatch_per_domain_in_random_order():
    base = data.synthetic(4, 12, (5, 5, 1), seed=6)
    parts = [domains.apply(p, n) for p, n in zip(domains.partition(base, 2), ["clean", "invert"])]
    sampler = domains.DomainBatchSampler(parts, batch_size=5, seed=1)
    pools = [{r.tobytes(): label for label, x in enumerate(p.images)
              for r in (x.astype(np.float32) / 255).reshape(len(x), -1)} for p in parts]
    orders = set()
    for index in range(6):
        x, y = sampler.batch(index)
        assert x.shape == (2, 5, 5, 5, 1) and y.dtype == np.int32
        order = []
        for row_x, row_y in zip(x, y):
            keys = [r.tobytes() for r in row_x.reshape(5, -1)]
            domain = [d for d in (0, 1) if keys[0] in pools[d]]
            assert len(domain) == 1 and all(k in pools[domain[0]] for k in keys)
            assert [pools[domain[0]][k] for k in keys] == row_y.tolist()     # labels = classes
            order.append(domain[0])
        orders.add(tuple(order))
    assert orders == {(0, 1), (1, 0)}
    np.testing.assert_array_equal(sampler.batch(3)[0], sampler.batch(3)[0])
    with pytest.raises(ValueError, match="batch_size"):
        domains.DomainBatchSampler(parts, batch_size=100)
