"""Evaluate meta-trained checkpoints (or a pixel-space nearest-neighbour baseline) on held-out
episodes: mean accuracy (MSE for sinusoids) with its 95% confidence interval, as the papers report.

Data, split and episode shape default to what the (first) checkpoint was trained with (its
config.json); any flag given overrides them. Every checkpoint is scored on the same episodes.

Examples:
  fm-eval --checkpoint=/tmp/protonet --n_way=5 --k_shot=1 --json
  fm-eval --checkpoint=/tmp/protonet --method=nn            # same episodes, raw-pixel 1-NN
  fm-eval --checkpoint=/tmp/maml_sinusoid,/tmp/pretrain_sinusoid   # MSE after 1 and 10 steps
"""

import json
import os

from pathlib import Path

from absl import app, flags, logging

import benchmarks
from benchmarks import flag_groups, run_flags
from functional_meta import configs              # free of TensorFlow, as this module

FLAGS = flags.FLAGS

flags.adopt_module_key_flags(run_flags)


flags.DEFINE_list("checkpoint", None, "Run folders of fm-train (their best checkpoint, else the "
                  "latest) or checkpoint prefixes (.../checkpoints/ckpt-N), joined by ','.")
flags.DEFINE_enum("method", "model", ["model", "nn", "class_mean"], "model: the checkpoints; nn: "
                  "1-nearest-neighbour on raw pixels; class_mean: nearest class-mean image.")
flags.DEFINE_enum("eval_split", "test", ["train", "val", "test"], "Which class split to sample "
                  "episodes from.")
flags.DEFINE_integer("num_episodes", 600, "Episodes scored (600 as in the MAML and ProtoNet "
                     "papers).", lower_bound=1)
flags.DEFINE_integer("eval_seed", 0, "Seed of the evaluation episodes.", lower_bound=0)
flags.DEFINE_bool("json", False, "Also print each result as one JSON line.")

DATA_FIELDS = ("data", "data_path", "rotations", "train_groups", "val_groups", "test_groups",
               "exclude_groups", "split", "val_fraction", "split_seed")
SPLIT_NAMES = {"train": 0, "val": 1, "test": 2}


def _data_config(base):
    """The data settings: a flag given on the command line wins, else the checkpoint's value."""
    config = dict(base)
    for name in DATA_FIELDS:
        if FLAGS[name].present or name not in config:
            config[name] = FLAGS[name].value
    config["split"] = [float(f) for f in config["split"]]
    if not config.get("data"):
        raise app.UsageError("--data is required without --checkpoint")
    if config["data"] in ("omniglot", "mnist", "folder") and not config.get("data_path"):
        raise app.UsageError(f"--data={config['data']} needs --data_path")
    return config


def _inner_steps(config):
    """MAML test-time inner steps to score: --inner_steps or the checkpoint's test_inner_steps;
    regression also after one step (the MAML paper's sinusoid table)."""
    if config["family"] != "maml":
        return [None]
    steps = FLAGS.inner_steps or config["test_inner_steps"]
    return sorted({1, steps}) if config["loss"] == "mse" else [steps]


def _report(name, result, settings):
    key = "accuracy" if "accuracy" in result else "mse"
    steps = settings.get("inner_steps")
    where = (f"{settings['n_way']}-way {settings['k_shot']}-shot" if key == "accuracy"
             else f"K={settings['k_shot']}")
    print(f"{name}: {key} {result[key]:.4f} ± {result[key + '_ci95']:.4f} (95% CI, "
          f"{settings['num_episodes']} episodes, {where}, {settings['split']} split"
          + (f", {steps} inner step{'s' * (steps != 1)}" if steps else "") + ")")
    if FLAGS.json:
        print(json.dumps({**settings, "name": name, **result}, sort_keys=True))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    paths = FLAGS.checkpoint or []
    if FLAGS.method == "model" and not paths:
        raise app.UsageError("--method=model needs --checkpoint")
    stored = []
    for path in paths:
        if not os.path.exists(path) and not os.path.exists(f"{path}.index"):
            raise app.UsageError(f"--checkpoint: {path} does not exist")
        try:
            stored.append(configs.load_config(path)[0])
        except ValueError as error:
            raise app.UsageError(f"--checkpoint: {error}") from None
    base = stored[0] if stored else {}
    data_config = _data_config(base)
    regression = data_config["data"] == "sinusoid"
    if regression and FLAGS.method != "model":
        raise app.UsageError("--method=nn/class_mean classify images; sinusoids need --method=model")
    for config in stored[1:]:
        if (config["loss"] == "mse") != regression:
            raise app.UsageError("--checkpoint: cannot score regression and classification "
                                 "checkpoints on the same episodes")
    n_way = FLAGS.n_way or (base.get("test_n_way") or base.get("n_way", 5))
    k_shot = FLAGS.k_shot or base.get("k_shot", 1)
    q_query = FLAGS.q_query or (base["q_query"] if base.get("family") == "maml" else 15)
    benchmarks.start_tensorflow()
    from functional_meta import checkpoints, training
    try:
        splits = training.load_splits(data_config)
    except ValueError as error:
        raise app.UsageError(f"bad data flags (--data/--data_path/--*_groups/--split): {error}") \
            from None
    classes = splits[SPLIT_NAMES[FLAGS.eval_split]]
    if classes is not None:
        try:
            training.check_split(classes, f"{FLAGS.eval_split} (--eval_split)", n_way, k_shot,
                                 q_query)
        except ValueError as error:
            raise app.UsageError(f"bad flags: {error}") from None
    batch = min(training.EVAL_BATCH, FLAGS.num_episodes)
    sampler = training.make_sampler(classes, n_way=n_way, k_shot=k_shot, q_query=q_query,
                                    meta_batch=batch, seed=FLAGS.eval_seed)
    settings = dict(split=FLAGS.eval_split, n_way=n_way, k_shot=k_shot, q_query=q_query,
                    num_episodes=FLAGS.num_episodes, eval_seed=FLAGS.eval_seed,
                    data=data_config["data"])
    if FLAGS.method != "model":
        result = training.evaluate(training.pixel_evaluator(FLAGS.method), None, sampler,
                                   FLAGS.num_episodes)
        _report(f"pixel {FLAGS.method}", result, dict(settings, method=FLAGS.method))
        return
    for path, config in zip(paths, stored):
        learner = training.make_learner(config, jit_compile=FLAGS.jit)
        state, info, found = checkpoints.restore_state(learner, path)
        if not os.path.exists(f"{path}.index") and Path(found).parent.name != "best":
            logging.warning("%s holds no best checkpoint (its run never validated): scoring the "
                            "latest, %s", path, found)
        for steps in _inner_steps(config):
            try:
                evaluator = training.make_evaluator(config, learner.apply, inner_steps=steps,
                                                    n_way=n_way, jit_compile=FLAGS.jit)
            except ValueError as error:
                raise app.UsageError(f"bad flags: {error}") from None
            result = training.evaluate(evaluator, state, sampler, FLAGS.num_episodes)
            _report(f"{config['algorithm']} {found} (step {info['step']})", result,
                    dict(settings, method="model", algorithm=config["algorithm"],
                         checkpoint=found, step=info["step"], inner_steps=steps))


def run():
    flag_groups.run_binary(main, __name__)


if __name__ == "__main__":
    run()
