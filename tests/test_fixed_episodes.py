"""Fixed episode files: Lake et al.'s run layout and episode folders, read from small generated
files (folders and zips), their errors, the round trip through ``save_episodes``, and fm-eval's
``--episodes``/``--save_episodes`` on a tiny trained ProtoNet and MAML."""

import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from _binaries import json_lines, run_binary
from functional_meta import data as data_lib
from functional_meta import episodes as episodes_lib
from functional_meta import fixed_episodes, nets, training

SIZE = 12
PREP = fixed_episodes.Preprocessing(channels=1, image_size=SIZE, invert=True)


def drawing(value, rng, size=SIZE):
    """A grey PNG: white background, a dark block whose grey level is ``value`` (so after
    inversion the class can be read off the image), plus a little noise."""
    image = np.full((size, size, 1), 255, np.uint8)
    image[3:9, 3:9] = value
    image[0, :4, 0] = rng.integers(250, 256, 4)
    return tf.io.encode_png(image).numpy()


def write_lake(root, runs=2, ways=4, order=None, rng=None):
    """Lake's layout with ``runs`` runs of ``ways`` classes; the test drawing ``itemMM`` belongs to
    class ``order[MM - 1]`` (a permutation), so file order and label differ."""
    rng = rng or np.random.default_rng(0)
    order = order or [3, 1, 4, 2][:ways]
    for r in range(1, runs + 1):
        run = Path(root, f"run{r:02d}")
        (run / "training").mkdir(parents=True)
        (run / "test").mkdir()
        for c in range(1, ways + 1):
            (run / "training" / f"class{c:02d}.png").write_bytes(drawing(10 * c + 20, rng))
        lines = []
        for i, c in enumerate(order, 1):
            (run / "test" / f"item{i:02d}.png").write_bytes(drawing(10 * c + 23, rng))
            lines.append(f"run{r:02d}/test/item{i:02d}.png run{r:02d}/training/class{c:02d}.png")
        (run / "class_labels.txt").write_text("\n".join(lines) + "\n")
    return Path(root)


def zip_folder(folder, path, prefix=""):
    with zipfile.ZipFile(path, "w") as archive:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                archive.write(p, prefix + p.relative_to(folder).as_posix())
    return path


def test_lake_labels_come_from_class_labels_not_file_order(tmp_path):
    folder = write_lake(tmp_path / "all_runs")
    runs = fixed_episodes.read(folder, PREP)
    assert [r.name for r in runs] == ["run01", "run02"]
    for run in runs:
        np.testing.assert_array_equal(run.support_y, [0, 1, 2, 3])
        np.testing.assert_array_equal(run.query_y, [2, 0, 3, 1])       # class03, class01, ...
        assert run.support_x.shape == (4, SIZE, SIZE, 1) and run.support_x.dtype == np.uint8
        # Inverted as Omniglot: the block of class c reads 255 - (10 c + 20).
        assert run.support_x[1, 5, 5, 0] == 255 - 40
    zipped = fixed_episodes.read(zip_folder(folder, tmp_path / "all_runs.zip", "all_runs/"), PREP)
    for a, b in zip(runs, zipped):
        np.testing.assert_array_equal(a.query_x, b.query_x)
        np.testing.assert_array_equal(a.query_y, b.query_y)
    # Raw-pixel nearest neighbour finds every class: error 0 in every run.
    values = fixed_episodes.score(training.pixel_evaluator("nn"), None, runs)
    rates, mean = fixed_episodes.lake_error_rates(values["accuracy"])
    np.testing.assert_array_equal(rates, [0.0, 0.0])
    assert mean == 0.0


@pytest.mark.parametrize("text, named", [
    ("run01/test/item01.png\n", "line 1: expected"),
    ("run01/test/item01.png run01/training/class03.png\n"
     "run01/test/item02.png run01/training/class09.png\n", "line 2: run01/training/class09.png"),
    ("run01/test/item01.png run01/training/class03.png\n"
     "run01/test/item01.png run01/training/class01.png\n", "line 2: run01/test/item01.png has a"),
    ("run01/test/item01.png run01/training/class03.png\n"
     "run01/test/item02.png run01/training/class01.png\n"
     "run01/test/item04.png run01/training/class02.png\n", "no line for run01/test/item03.png"),
])
def test_lake_bad_or_missing_lines_name_the_file_and_line(tmp_path, text, named):
    folder = write_lake(tmp_path / "all_runs", runs=1)
    (folder / "run01" / "class_labels.txt").write_text(text)
    with pytest.raises(ValueError, match="class_labels.txt") as error:
        fixed_episodes.read(folder, PREP)
    assert named in str(error.value)


def write_episode(root, name, support, query, rng):
    """``support``/``query``: {class: images}; each image a block of the class's grey level."""
    for s, sets in (("support", support), ("query", query)):
        for c, count in sets.items():
            folder = Path(root, name, s, c)
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i}.png").write_bytes(drawing(30 + 50 * "abc".index(c[0]), rng))


def test_episode_folders_and_zips_read_alike_with_sorted_class_labels(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "eps"
    write_episode(root, "ep1", {"b_cat": 2, "a_dog": 2}, {"a_dog": 1, "b_cat": 3}, rng)
    write_episode(root, "ep0", {"c": 1, "a": 1}, {"c": 2}, rng)
    (root / "README.txt").write_text("not an image: ignored")
    folder = fixed_episodes.read(root, PREP)
    zipped = fixed_episodes.read(zip_folder(root, tmp_path / "eps.zip"), PREP)
    for got in (folder, zipped):
        assert [e.name for e in got] == ["ep0", "ep1"]
        assert got[1].classes == ["a_dog", "b_cat"]
        # Sorted by file name, then class: 0.png of a_dog, 0.png of b_cat, 1.png of ...
        np.testing.assert_array_equal(got[1].support_y, [0, 1, 0, 1])
        np.testing.assert_array_equal(got[1].query_y, [0, 1, 1, 1])
        np.testing.assert_array_equal(got[0].query_y, [1, 1])
    values = fixed_episodes.score(training.pixel_evaluator("nn"), None, folder)
    np.testing.assert_array_equal(values["accuracy"], [1.0, 1.0])


@pytest.mark.parametrize("layout, named", [
    ({"support": {"a": 1}, "query": {"b": 1}}, "query class 'b' has no support"),
    ({"support": {"a": 1}, "query": {}}, "has no query images"),
])
def test_bad_episode_folders_are_named(tmp_path, layout, named):
    write_episode(tmp_path, "ep7", layout["support"], layout["query"], np.random.default_rng(0))
    with pytest.raises(ValueError, match=named) as error:
        fixed_episodes.read(tmp_path, PREP)
    assert "ep7" in str(error.value)


def test_an_image_outside_the_layout_is_named(tmp_path):
    write_episode(tmp_path, "ep0", {"a": 1}, {"a": 1}, np.random.default_rng(0))
    (tmp_path / "ep0" / "stray.png").write_bytes(drawing(10, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="stray.png: expected EPISODE/support"):
        fixed_episodes.read(tmp_path, PREP)


def test_saved_episodes_read_back_equal_and_score_the_same(tmp_path):
    classes = data_lib.synthetic(8, 6, (SIZE, SIZE, 1), seed=3)
    sampler = episodes_lib.EpisodeSampler(classes, 3, 2, 2, meta_batch=4, seed=5)
    batch = sampler.batch(0)
    for invert in (False, True):
        prep = PREP._replace(invert=invert)
        out = tmp_path / f"saved_{invert}"
        names = fixed_episodes.save_episodes(out, batch, 10, prep)
        assert names[0] == "episode00010"
        got = fixed_episodes.read(out, prep)
        again = next(fixed_episodes.batches(got, 25))
        for a, b in zip(batch, again):
            np.testing.assert_array_equal(a, b)
    config = {"algorithm": "protonet", "metric": "euclidean", "n_way": 3, "family": "protonet"}
    init, apply = nets.conv4(None, channels=4, in_shape=(SIZE, SIZE, 1), pool="max", blocks=2)
    evaluator = training.make_evaluator(config, apply, jit_compile=False)
    state = {"weights": init(0)}
    np.testing.assert_array_equal(evaluator(state, batch)["accuracy"],
                                  fixed_episodes.score(evaluator, state, got)["accuracy"])


@pytest.mark.slow
def test_fm_eval_saves_episodes_rescores_them_and_scores_lake_runs(tmp_path, capsys):
    """fm-eval --save_episodes then --episodes gives the same accuracy; Lake's 20-way runs score a
    ProtoNet and print the published figures; a 5-way MAML head is refused with the reason."""
    from absl import app
    from benchmarks import evaluate, train
    common = ["--data=synthetic", "--steps=2", "--log_every=1", "--val_every=0",
              "--checkpoint_every=2", "--channels=4"]
    proto, maml = tmp_path / "proto", tmp_path / "maml"
    run_binary(train, ["--algorithm=protonet", "--n_way=5", "--q_query=2", f"--out_dir={proto}",
                       *common])
    run_binary(train, ["--algorithm=maml", "--preset=maml_mnist_mlp", "--hidden=8",
                       "--meta_batch=2", f"--out_dir={maml}", *common[:-1]])
    assert (proto / "config.json").exists() and (maml / "config.json").exists()
    saved = tmp_path / "saved"
    capsys.readouterr()
    run_binary(evaluate, [f"--checkpoint={proto}", "--num_episodes=6",
                          f"--save_episodes={saved}", "--json"])
    first = json_lines(capsys.readouterr().out)
    assert len(list(saved.glob("episode0*"))) == 6 and (saved / "episodes.json").exists()
    run_binary(evaluate, [f"--checkpoint={proto}", f"--episodes={saved}", "--json"])
    a, b = first[0], json_lines(capsys.readouterr().out)[0]
    assert a["accuracy"] == b["accuracy"] and a["accuracy_ci95"] == b["accuracy_ci95"]
    # Lake's layout at 28 px (synthetic preprocessing: no inversion), 20 ways.
    lake = tmp_path / "all_runs"
    rng = np.random.default_rng(0)
    order = list(rng.permutation(20) + 1)
    write_lake(lake, runs=2, ways=20, order=[int(c) for c in order], rng=rng)
    run_binary(evaluate, [f"--checkpoint={proto}", f"--episodes={lake}"])
    scored = capsys.readouterr().out
    assert "run01" in scored and "mean error" in scored
    assert "Bayesian program learning" in scored and "3.3%" in scored
    with pytest.raises(app.UsageError) as refused:
        run_binary(evaluate, [f"--checkpoint={maml}", f"--episodes={lake}"])
    assert "20-way" in str(refused.value) and "5 outputs" in str(refused.value)
