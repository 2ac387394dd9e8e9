"""fm-train --image_size: the images resized to another square size, stored in config.json and
scored at that size by fm-eval; errors naming the flag before any training."""

import json

import pytest
from absl import app

from benchmarks import evaluate, train
from functional_meta import presets
from _binaries import run_binary as _run
from test_within_group import _write_folder


def test_trains_and_scores_at_the_given_size(tmp_path, capsys):
    _write_folder(tmp_path / "images", [5, 3])      # 28x28 images, groups g0 and g1
    run = tmp_path / "run"
    data = ["--data=folder", f"--data_path={tmp_path / 'images'}", "--train_groups=g0",
            "--test_groups=g1"]
    _run(train, ["--algorithm=protonet", *data, "--image_size=32", "--channels=4", "--n_way=3",
                 "--k_shot=1", "--q_query=1", "--meta_batch=1", "--steps=2", "--val_every=0",
                 "--checkpoint_every=2", "--log_every=1", "--nojit", f"--out_dir={run}"])
    config = json.loads((run / "config.json").read_text())
    assert config["image_shape"] == [32, 32, 1]
    # Four 2x2 max poolings take 32x32 to 2x2: a 2*2*4-d embedding (1x1x4 at the preset's 28).
    assert presets.network(config)[0].embedding_size == 16
    capsys.readouterr()
    # The stored size reaches fm-eval's data; the network refuses images of another shape.
    _run(evaluate, [f"--checkpoint={run}", "--n_way=3", "--k_shot=1", "--q_query=1",
                    "--num_episodes=2", "--bn=support", "--tta=5", "--nojit"])
    assert "3-way 1-shot" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--algorithm=protonet", "--data=synthetic", "--image_size=8"],
     r"--image_size=8 is too small for net=conv4 \(pool='max'\): allowed at least 16"),
    (["--algorithm=protonet", "--data=synthetic", "--augment_shift=20", "--image_size=17"],
     r"--image_size=17 .* and --augment_shift=20: allowed at least 21"),
    (["--algorithm=maml", "--data=sinusoid", "--image_size=28"],
     r"--image_size resizes the images of --data=omniglot.*--data=sinusoid"),
    (["--algorithm=maml_rl", "--image_size=28"], r"--image_size resizes images"),
])
def test_errors_name_the_flag_and_range_before_training(tmp_path, argv, message):
    with pytest.raises(app.UsageError, match=message):
        _run(train, [*argv, f"--out_dir={tmp_path}"])
    assert not list(tmp_path.glob("checkpoints*")) and not (tmp_path / "config.json").exists()
