"""Within-group episodes (``EpisodeSampler(within_group=True)``, ``--episodes_within_group``):
every class of an episode from one group, small groups skipped, an error when none is left."""

import numpy as np
import pytest

from _binaries import run_binary
from functional_meta import data, episodes, training


def _grouped(sizes, per_class=4):
    """Classes in groups of the given sizes; every image spells out its class index."""
    images, names, groups = [], [], []
    for g, size in enumerate(sizes):
        for _ in range(size):
            c = len(names)
            images.append(np.full((per_class, 2, 2, 1), c, np.uint8))
            names.append(f"g{g}/c{c}")
            groups.append(f"g{g}")
    return data.ClassData(images, names, groups)


def _classes(x):
    """Class index of every image of ``x [B, S, 2, 2, 1]`` made by ``_grouped``."""
    return np.round(x[..., 0, 0, 0] * 255).astype(int)


def test_episodes_never_mix_groups_and_reach_every_large_group(monkeypatch):
    classes = _grouped([3, 6, 5, 9, 2])
    group_of = np.array([int(g[1:]) for g in classes.groups])
    logged = []
    monkeypatch.setattr(episodes.logging, "info", lambda fmt, *args: logged.append(fmt % args))
    sampler = episodes.EpisodeSampler(classes, 5, 1, 2, meta_batch=50, seed=3, within_group=True)
    assert logged == ["within-group episodes: skipped 2 of 5 groups with fewer than 5 classes "
                      "(g0, g4)"]
    seen = set()
    for _ in range(8):                                          # 400 episodes
        sx, sy, qx, qy = sampler.sample()
        for e in range(len(sx)):
            support, query = _classes(sx[e]), _classes(qx[e])
            groups = set(group_of[support]) | set(group_of[query])
            assert len(groups) == 1, groups
            assert len(set(support)) == 5                       # n_way distinct classes
            seen |= groups
    assert seen == {1, 2, 3}                                    # groups 0 and 4 are too small
    assert sampler.skipped_groups == ["g0", "g4"]


def test_across_groups_by_default():
    classes = _grouped([5, 5, 5])
    group_of = np.array([int(g[1:]) for g in classes.groups])
    sx = episodes.EpisodeSampler(classes, 5, 1, 1, meta_batch=40, seed=0).sample()[0]
    mixed = sum(len(set(group_of[_classes(sx[e])])) > 1 for e in range(len(sx)))
    assert mixed > 30


def test_same_seed_same_episodes_and_other_seed_others():
    classes = _grouped([6, 7, 8])
    a = episodes.EpisodeSampler(classes, 4, 1, 2, meta_batch=6, seed=5, within_group=True)
    b = episodes.EpisodeSampler(classes, 4, 1, 2, meta_batch=6, seed=5, within_group=True)
    c = episodes.EpisodeSampler(classes, 4, 1, 2, meta_batch=6, seed=6, within_group=True)
    for index in (0, 3):
        for x, y in zip(a.batch(index), b.batch(index)):
            np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.batch(0)[0], c.batch(0)[0])


def test_no_group_large_enough_is_an_error_naming_flag_way_and_largest_group():
    classes = _grouped([3, 7, 4])
    with pytest.raises(ValueError, match=r"--episodes_within_group.*n_way=8.*'g1', has 7"):
        episodes.EpisodeSampler(classes, 8, 1, 1, within_group=True)
    episodes.EpisodeSampler(classes, 7, 1, 1, within_group=True)          # g1 alone is enough


def test_make_sampler_refuses_sequences_and_sinusoids():
    with pytest.raises(ValueError, match="within_group"):
        training.make_sampler(None, n_way=1, k_shot=5, q_query=5, meta_batch=1, seed=0,
                              within_group=True)
    with pytest.raises(ValueError, match="within_group"):
        training.make_sampler(_grouped([5]), n_way=5, k_shot=1, q_query=1, meta_batch=1,
                              seed=0, sequences=True, within_group=True)


def _write_folder(root, sizes):
    """An image folder root/group/class/*.png with classes in groups of ``sizes``."""
    import tensorflow as tf
    rng = np.random.default_rng(0)
    for g, size in enumerate(sizes):
        for c in range(size):
            folder = root / f"g{g}" / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(4):
                png = tf.io.encode_png(rng.integers(0, 255, (28, 28, 1), dtype=np.uint8))
                (folder / f"{i}.png").write_bytes(png.numpy())


def test_fm_eval_flag_scores_within_groups_and_errors_before_any_model(tmp_path, capsys):
    from absl import app
    from benchmarks import evaluate
    _write_folder(tmp_path / "images", [3, 6])
    common = ["--data=folder", f"--data_path={tmp_path / 'images'}", "--test_groups=g0,g1",
              "--method=nn", "--k_shot=1", "--q_query=1", "--num_episodes=4",
              "--episodes_within_group"]
    with pytest.raises(app.UsageError, match=r"episodes_within_group.*n_way=7.*'g1', has 6"):
        run_binary(evaluate, common + ["--n_way=7"])
    run_binary(evaluate, common + ["--n_way=5"])
    assert "each episode within one group" in capsys.readouterr().out


def test_fm_train_flag_errors_before_training(tmp_path):
    from absl import app
    from benchmarks import train
    # Synthetic classes are each their own group: no group has 5 classes.
    with pytest.raises(app.UsageError, match=r"episodes_within_group.*n_way=5.*has 1 classes"):
        run_binary(train, ["--algorithm=protonet", "--data=synthetic", "--n_way=5",
                           "--episodes_within_group", f"--out_dir={tmp_path}"])
    assert not list(tmp_path.glob("checkpoints*"))
