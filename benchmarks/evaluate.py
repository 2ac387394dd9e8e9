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

from absl import app, flags

from functional_meta import training

FLAGS = flags.FLAGS

# Data, class splits and episode shape. fm-train and fm-eval define these flags identically
# (allow_override lets both binaries be imported into one process); in fm-eval a flag left unset
# takes the checkpoint's value from its config.json.
_SHARED = dict(allow_override=True)
flags.DEFINE_enum("data", None, list(training.DATA_SOURCES),
                  "Data source; default: the preset's (fm-eval: the checkpoint's). 'sinusoid' is "
                  "the MAML regression task.", **_SHARED)
flags.DEFINE_string("data_path", None,
                    "Zip/folder/.npz of the source (several Omniglot zips joined by ','); for the "
                    "TFDS sources an optional data_dir.", **_SHARED)
flags.DEFINE_bool("rotations", False, "Add each class rotated by 90/180/270 degrees as new "
                  "classes (training split only; validation and test use the originals).",
                  **_SHARED)
flags.DEFINE_list("train_groups", None, "Groups (Omniglot alphabets) for meta-training; default: "
                  "all not in --val_groups/--test_groups.", **_SHARED)
flags.DEFINE_list("val_groups", None, "Groups for validation; default: --val_fraction of the "
                  "training classes.", **_SHARED)
flags.DEFINE_list("test_groups", None, "Groups for meta-testing; default: all groups not used for "
                  "training or validation.", **_SHARED)
flags.DEFINE_list("exclude_groups", None, "Groups dropped before any split.", **_SHARED)
flags.DEFINE_list("split", ["0.7", "0.1", "0.2"], "Train,val,test fractions of the groups, used "
                  "when neither --train_groups nor --test_groups is given.", **_SHARED)
flags.DEFINE_float("val_fraction", 0.1, "With group lists and no --val_groups: the fraction of "
                   "training classes held out for validation (0 = none).", **_SHARED)
flags.DEFINE_integer("split_seed", 0, "Seed of the random class splits.", lower_bound=0, **_SHARED)
flags.DEFINE_bool("jit", None, "XLA-compile the steps; default: on for MAML-style algorithms, for "
                  "ProtoNet only on GPU (oneDNN convolutions are faster on CPU).", **_SHARED)
flags.DEFINE_integer("n_way", None, "Classes per episode; default: the preset's (fm-eval: the "
                     "checkpoint's test way).", lower_bound=1, **_SHARED)
flags.DEFINE_integer("k_shot", None, "Support examples per class; default: the preset's (fm-eval: "
                     "the checkpoint's).", lower_bound=1, **_SHARED)
flags.DEFINE_integer("q_query", None, "Query examples per class; default: the preset's (fm-eval: "
                     "the checkpoint's for MAML, so batch norm sees query sets of the trained "
                     "size; 15 for ProtoNet and the pixel baselines).", lower_bound=1, **_SHARED)

flags.DEFINE_integer("inner_steps", None, "MAML inner steps; default: the preset's (fm-eval: at "
                     "test time, default the checkpoint's test_inner_steps; sinusoids are also "
                     "scored after 1 step).", lower_bound=1, **_SHARED)


@flags.validator("data_path", "--data_path: every path (joined by ',') must exist")
def _check_data_path(value):
    return value is None or all(os.path.exists(p) for p in value.split(","))


@flags.validator("split", "--split: three non-negative fractions train,val,test summing to <= 1")
def _check_split(value):
    try:
        fractions = [float(v) for v in value]
    except (TypeError, ValueError):
        return False
    return len(fractions) == 3 and min(fractions) >= 0 and sum(fractions) <= 1 + 1e-9


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
    configs = []
    for path in paths:
        if not os.path.exists(path) and not os.path.exists(f"{path}.index"):
            raise app.UsageError(f"--checkpoint: {path} does not exist")
        try:
            configs.append(training.load_config(path)[0])
        except ValueError as error:
            raise app.UsageError(f"--checkpoint: {error}") from None
    base = configs[0] if configs else {}
    data_config = _data_config(base)
    regression = data_config["data"] == "sinusoid"
    if regression and FLAGS.method != "model":
        raise app.UsageError("--method=nn/class_mean classify images; sinusoids need --method=model")
    for config in configs[1:]:
        if (config["loss"] == "mse") != regression:
            raise app.UsageError("--checkpoint: cannot score regression and classification "
                                 "checkpoints on the same episodes")
    n_way = FLAGS.n_way or (base.get("test_n_way") or base.get("n_way", 5))
    k_shot = FLAGS.k_shot or base.get("k_shot", 1)
    q_query = FLAGS.q_query or (base["q_query"] if base.get("family") == "maml" else 15)
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
    for path, config in zip(paths, configs):
        learner = training.make_learner(config, jit_compile=FLAGS.jit)
        state, info, found = training.restore_state(learner, path)
        for steps in _inner_steps(config):
            try:
                evaluator = training.make_evaluator(config, learner.apply, inner_steps=steps,
                                                    n_way=n_way, jit_compile=FLAGS.jit)
            except ValueError as error:
                raise app.UsageError(f"bad flags: {error}") from None
            result = training.evaluate(evaluator, state, sampler, FLAGS.num_episodes)
            _report(f"{config['algorithm']} {path}", result,
                    dict(settings, method="model", algorithm=config["algorithm"],
                         checkpoint=found, step=info["step"], inner_steps=steps))


def run():
    app.run(main)


if __name__ == "__main__":
    run()
