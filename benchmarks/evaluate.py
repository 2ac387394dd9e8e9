"""Evaluate meta-trained checkpoints (or a pixel-space nearest-neighbour baseline) on held-out
episodes: mean accuracy (MSE for sinusoids) with its 95% confidence interval, as the papers report.

Data, split and episode shape default to what the (first) checkpoint was trained with (its
config.json); any flag given overrides them. Every checkpoint is scored on the same episodes.

Fixed episodes (functional_meta.fixed_episodes): --episodes scores a folder or zip of episodes
as given, images preprocessed as each checkpoint's training data were: Lake et al.'s one-shot
runs (all_runs.zip: error rate per run and their mean, beside the published figures) or episode
folders EPISODE/{support,query}/CLASS/*.png, which --save_episodes writes from the episodes
sampled here, so anyone can score again on exactly the same ones.

--bn=support normalises the queries with the support set's batch-norm statistics alone, so each
query is scored independently of the others (strictly inductive); the default, transductive, is
how the networks train: ProtoNet normalises support and queries together, MAML the query set as
a batch.

Examples:
  fm-eval --checkpoint=/tmp/protonet --n_way=5 --k_shot=1 --json
  fm-eval --checkpoint=/tmp/protonet --method=nn            # same episodes, raw-pixel 1-NN
  fm-eval --checkpoint=/tmp/maml_sinusoid,/tmp/pretrain_sinusoid   # MSE after 1 and 10 steps
  fm-eval --checkpoint=/tmp/protonet --episodes=all_runs.zip --bn=support   # Lake et al.'s runs
  fm-eval --checkpoint=/tmp/protonet --save_episodes=/tmp/episodes     # then --episodes=...
  fm-eval --checkpoint=/tmp/mann,/tmp/lstm --plot_instances=by_instance.png
  fm-eval --checkpoint=/tmp/mann --method=class_mean   # its inputs alone, no learnt controller
  fm-eval --checkpoint=/tmp/nav,/tmp/nav_pretrained --num_episodes=100 --plot_dir=/tmp/nav_plots
"""

import csv
import importlib
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
                  "1-nearest-neighbour on raw pixels; class_mean: nearest class-mean image. With "
                  "MANN/LSTM checkpoints, nn and class_mean classify each step of the sequences "
                  "from the earlier steps' labels, on what the checkpoint's controller reads "
                  "(its encoder's features and/or the pixels): what those inputs allow without "
                  "a learnt controller.")
flags.DEFINE_enum("eval_split", "test", ["train", "val", "test"], "Which class split to sample "
                  "episodes from.")
flags.DEFINE_integer("num_episodes", 600, "Episodes scored (600 as in the MAML and ProtoNet "
                     "papers; for MANN/LSTM checkpoints the default is 1000).", lower_bound=1)
flags.DEFINE_integer("eval_seed", 0, "Seed of the evaluation episodes.", lower_bound=0)
flags.DEFINE_string("test_domain", None, "Score in this image style (a functional_meta.domains "
                    "name: clean, rotate:DEGREES, dilate:R, erode:R, blur:SIGMA, noise:STD, "
                    "invert, elastic:ALPHA:SIGMA, joined by '+' to compose), e.g. blur:1.5. "
                    "Episodic checkpoints: the --eval_split classes restyled, support and query "
                    "alike. mldg/erm checkpoints: the share of every class's images their run "
                    "held out from all training domains, restyled. Default: clean.")
flags.DEFINE_bool("json", False, "Also print each result as one JSON line.")
flags.DEFINE_string("plot_instances", None, "MANN/LSTM checkpoints: draw their accuracy against the "
                    "instance number of a class in its sequence, one line each with its 95% band "
                    "(Santoro et al. 2016, Figure 2), as this PNG file, and write the figures as "
                    "a CSV beside it (same name, .csv). Needs matplotlib.")
flags.DEFINE_string("episodes", None, "Score these fixed episodes (a folder or zip) instead of "
                    "sampling: Lake et al.'s runs (runNN/training, runNN/test, "
                    "runNN/class_labels.txt, as all_runs.zip) or episode folders "
                    "EPISODE/{support,query}/CLASS/*.png. Images are preprocessed as the "
                    "checkpoint's training data (its config.json); without --checkpoint as "
                    "--data's at 28x28x1. The files fix the ways, shots and queries.")
flags.DEFINE_string("save_episodes", None, "Also write the episodes sampled here to this folder "
                    "as EPISODE/{support,query}/CLASS/*.png (and episodes.json with the settings), "
                    "for --episodes.")


flags.DEFINE_integer("finetune_steps", 0, "ProtoNet: before scoring each episode, fine-tune the "
                     "embedding and a linear head initialised from the prototypes (Proto-MAML: "
                     "W = 2c, b = -|c|^2, ProtoNet's euclidean scores) for this many gradient "
                     "steps on the cross-entropy of the support set and its --tta views, the only "
                     "labelled data of an episode (1-shot support images sit on their prototypes: "
                     "use --tta>1 there). Inductive with --bn=support. 0 = none.", lower_bound=0)
flags.DEFINE_float("finetune_lr", 0.01, "ProtoNet: rate of the --finetune_steps gradient steps.",
                   lower_bound=0)
flags.DEFINE_integer("tta", 1, "ProtoNet: test-time augmentation, prototypes averaged over the "
                     "support set's first N fixed views: identity, shifts by one pixel down, "
                     "up, right, left, rotations by +10 and -10 degrees, scalings by 0.9 and "
                     "1.1 (1 = the images alone, plain ProtoNet). MANN/LSTM: each sequence "
                     "is run again with every image under each view and each step's class "
                     "probabilities averaged over the runs (inductive: one sequence at a time).",
                     lower_bound=1, upper_bound=9)
flags.DEFINE_boolean("tta_queries", False, "ProtoNet: also embed each query under the same --tta "
                     "views and average its scores over them (euclidean: the same ranking as "
                     "the mean of its view embeddings). Needs --tta>1; inductive with "
                     "--bn=support.")
flags.DEFINE_integer("transductive_steps", 0, "ProtoNet: refine the prototypes this many times "
                     "with the episode's unlabelled queries (soft k-means, Ren et al. 2018): "
                     "each becomes the mean of its support images and of every query weighted by "
                     "the current probability of its class. Transductive, whatever --bn says: a "
                     "query's score depends on the episode's other queries (here 15 per class, a "
                     "balanced set). With --ensemble the runs refine jointly by their mean "
                     "probability, each run's own line alone. 0 = inductive scoring (default).",
                     lower_bound=0, upper_bound=20)
flags.DEFINE_boolean("ensemble", False, "ProtoNet: with two or more --checkpoint runs, also score "
                     "their ensemble on the same episodes: the class of highest mean "
                     "log-probability over the runs, each scored with this command's --bn, --tta, "
                     "--tta_queries and --finetune_* options. MANN/LSTM runs of one way: each "
                     "step's class of highest mean probability, by instance as each run's.")
flags.DEFINE_string("plot_dir", None, "MAML-RL checkpoints: write returns.csv (the printed "
                    "returns), returns.png (return against policy-gradient steps, every "
                    "checkpoint and the random policy) and, for navigation2d, trajectories.png "
                    "(a held-out goal, trajectories before and after each step) here.")


@flags.validator("episodes", "--episodes: the folder or zip must exist")
def _check_episodes(value):
    return value is None or os.path.exists(value)

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


def _adapt():
    """ProtoNet's test-time adaptation options (``training.make_evaluator``'s ``adapt``), or None."""
    if not (FLAGS.finetune_steps or FLAGS.tta > 1 or FLAGS.tta_queries
            or FLAGS.transductive_steps):
        return None
    return {"steps": FLAGS.finetune_steps, "lr": FLAGS.finetune_lr, "views": FLAGS.tta,
            "query_views": FLAGS.tta_queries, "transductive_steps": FLAGS.transductive_steps}


def _evaluator(config, learner, steps, n_way, context):
    """``training.make_evaluator`` with the flags' settings; a ``ValueError`` becomes a usage
    error that starts with ``context``."""
    from functional_meta import training
    try:
        return training.make_evaluator(config, learner.apply, inner_steps=steps, n_way=n_way,
                                       jit_compile=FLAGS.jit, bn=_bn(config), adapt=_adapt())
    except ValueError as error:
        raise app.UsageError(f"{context}: {error}") from None


def _adapt_words(adapt, sequences=False):
    if not adapt:
        return ""
    if sequences:
        return f", probabilities averaged over {adapt['views']} views of every image"
    tuned = f", fine-tuned {adapt['steps']} steps at {adapt['lr']:g}" if adapt["steps"] else ""
    queries = ", queries too" if adapt["query_views"] else ""
    refined = adapt["transductive_steps"]
    refined = (f", prototypes refined {refined} time{'s' * (refined != 1)} by the queries "
               "(transductive)") if refined else ""
    views = f", {adapt['views']} support views{queries}" if adapt["views"] > 1 else ""
    return tuned + views + refined


def _bn(config):
    """--bn, else how the checkpoint was trained (``config['bn']``)."""
    return FLAGS.bn or config.get("bn", "transductive")


def _report(name, result, settings):
    key = "accuracy" if "accuracy" in result else "mse"
    steps = settings.get("inner_steps")
    where = (f"{settings['n_way']}-way {settings['k_shot']}-shot" if key == "accuracy"
             else f"K={settings['k_shot']}")
    if settings.get("sequences"):
        where = f"sequences of {settings['n_way']} classes x {settings['k_shot']} instances"
    source = (f"fixed episodes {settings['episodes']}" if settings.get("episodes")
              else f"{settings['split']} split"
              + (", each episode within one group" if settings.get("within_group") else ""))
    print(f"{name}: {key} {result[key]:.4f} ± {result[key + '_ci95']:.4f} (95% CI, "
          f"{settings['num_episodes']} episodes, {where}, {source}"
          + (f", {steps} inner step{'s' * (steps != 1)}" if steps else "")
          + (f", {settings['bn']} batch norm" if settings.get("bn") else "")
          + _adapt_words(settings.get("adapt"), settings.get("sequences"))
          + (f", test domain {settings['test_domain']}"
             if settings.get("test_domain", "clean") != "clean" else "") + ")")
    if FLAGS.json:
        print(json.dumps({**settings, "name": name, **result}, sort_keys=True))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    paths = FLAGS.checkpoint or []
    if FLAGS.method == "model" and not paths:
        raise app.UsageError("--method=model needs --checkpoint")
    if FLAGS.method != "model" and _adapt():
        raise app.UsageError(f"--method={FLAGS.method} is a fixed rule with nothing to adapt: "
                             "leave out --tta/--tta_queries/--finetune_steps/"
                             "--transductive_steps (or use --method=model)")
    stored = []
    for path in paths:
        if not os.path.exists(path) and not os.path.exists(f"{path}.index"):
            raise app.UsageError(f"--checkpoint: {path} does not exist")
        try:
            stored.append(configs.load_config(path)[0])
        except ValueError as error:
            raise app.UsageError(f"--checkpoint: {error}") from None
    base = stored[0] if stored else {}
    if base.get("algorithm") in configs.RL_ALGORITHMS:    # MAML-RL: returns on held-out tasks
        from benchmarks import rl_run
        return rl_run.evaluate_main(paths, stored)
    if base.get("algorithm") in configs.SUPERVISED_ALGORITHMS:
        return _score_supervised(paths, stored)
    if FLAGS.episodes:
        if _sequence_checkpoints(stored):
            raise app.UsageError("--episodes holds support/query episodes; MANN/LSTM checkpoints "
                                 "are scored on sampled sequences")
        if FLAGS.save_episodes or FLAGS.episodes_within_group or FLAGS.ensemble:
            raise app.UsageError("--save_episodes/--episodes_within_group/--ensemble are for "
                                 "sampled episodes; with --episodes nothing is sampled")
        return _score_fixed(paths, stored)
    if FLAGS.save_episodes and os.path.isdir(FLAGS.save_episodes) \
            and os.listdir(FLAGS.save_episodes):
        raise app.UsageError(f"--save_episodes={FLAGS.save_episodes} is not empty: choose a new "
                             "folder")
    sequence = _sequence_checkpoints(stored)
    if FLAGS.ensemble:
        _check_ensemble(stored, sequence)
    if sequence and (FLAGS.save_episodes or FLAGS.test_domain):
        raise app.UsageError("--save_episodes/--test_domain are for support/query episodes, not "
                             "MANN/LSTM sequences")
    if FLAGS.plot_instances and not sequence:
        raise app.UsageError("--plot_instances draws accuracy by instance: it needs MANN/LSTM "
                             "checkpoints")
    if FLAGS.plot_instances:
        try:
            importlib.import_module("matplotlib")
        except ImportError:
            raise app.UsageError("--plot_instances needs matplotlib: pip install 'functional_meta[plot]' "
                                 "(or pip install matplotlib)") from None
    data_config = _data_config(base)
    regression = data_config["data"] == "sinusoid"
    if regression and FLAGS.method != "model":
        raise app.UsageError("--method=nn/class_mean classify images; sinusoids need --method=model")
    for config in stored[1:]:
        if (config.get("loss") == "mse") != regression:
            raise app.UsageError("--checkpoint: cannot score regression and classification "
                                 "checkpoints on the same episodes")
    n_way = FLAGS.n_way or (base.get("test_n_way") or base.get("n_way", 5))
    k_shot = FLAGS.k_shot or base.get("k_shot", 1)
    q_query = FLAGS.q_query or (base["q_query"] if base.get("family") == "maml" else 15)
    num_episodes = FLAGS.num_episodes
    if sequence:                   # no query set; at least 1000 sequences unless asked otherwise
        q_query = 0
        num_episodes = num_episodes if FLAGS["num_episodes"].present else SEQUENCE_EPISODES
    benchmarks.start_tensorflow()
    from functional_meta import checkpoints, training
    try:
        splits = training.load_splits(data_config)
    except ValueError as error:
        raise app.UsageError(f"bad data flags (--data/--data_path/--*_groups/--split): {error}") \
            from None
    classes = splits[SPLIT_NAMES[FLAGS.eval_split]]
    test_domain = _test_domain()
    if test_domain != "clean":
        if classes is None:
            raise app.UsageError("--test_domain restyles images; sinusoid tasks have none")
        from functional_meta import domains
        classes = domains.apply(classes, test_domain)
    if classes is not None:
        try:
            training.check_split(classes, f"{FLAGS.eval_split} (--eval_split)", n_way, k_shot,
                                 q_query)
        except ValueError as error:
            raise app.UsageError(f"bad flags: {error}") from None
    batch = min(training.EVAL_BATCH, num_episodes)
    try:
        sampler = training.make_sampler(classes, n_way=n_way, k_shot=k_shot, q_query=q_query,
                                        meta_batch=batch, seed=FLAGS.eval_seed,
                                        sequences=sequence,
                                        within_group=FLAGS.episodes_within_group)
    except ValueError as error:
        raise app.UsageError(f"bad flags: {error}") from None
    settings = dict(split=FLAGS.eval_split, n_way=n_way, k_shot=k_shot, q_query=q_query,
                    num_episodes=num_episodes, eval_seed=FLAGS.eval_seed, sequences=sequence,
                    data=data_config["data"], test_domain=test_domain,
                    within_group=FLAGS.episodes_within_group)
    if FLAGS.save_episodes:
        _save_episodes(sampler, settings, dict(base, data=data_config["data"],
                                               image_shape=sampler.image_shape))
    if FLAGS.method != "model" and not sequence:
        result = training.evaluate(training.pixel_evaluator(FLAGS.method), None, sampler,
                                   num_episodes)
        _report(f"pixel {FLAGS.method}", result, dict(settings, method=FLAGS.method))
        return
    curves, members = {}, []
    for path, config in zip(paths, stored):
        learner = training.make_learner(config, jit_compile=FLAGS.jit)
        state, info, found = checkpoints.restore_state(learner, path)
        if not os.path.exists(f"{path}.index") and Path(found).parent.name != "best":
            logging.warning("%s holds no best checkpoint (its run never validated): scoring the "
                            "latest, %s", path, found)
        if FLAGS.ensemble:        # scored together below, each member from the same pass
            members.append((config, learner.apply, state, found, info["step"]))
            continue
        for steps in _inner_steps(config):
            name = f"{config['algorithm']} {found} (step {info['step']})"
            curve = f"{config['algorithm']} (step {info['step']})"
            if FLAGS.method == "model":
                evaluator = _evaluator(config, learner, steps, n_way, "bad flags")
            else:                 # a sequence model's inputs, classified by the rule alone
                evaluator = training.sequence_baseline_evaluator(config, FLAGS.method)
                name, curve = (f"{FLAGS.method} on the inputs of {n}" for n in (name, curve))
            result = training.evaluate(evaluator, state, sampler, num_episodes)
            _report(name, result, dict(settings, method=FLAGS.method,
                                       algorithm=config["algorithm"], checkpoint=found,
                                       step=info["step"], inner_steps=steps,
                                       bn=None if sequence else _bn(config), adapt=_adapt()))
            if sequence:
                _report_instances(result)
                curves[curve] = result
    if FLAGS.ensemble and sequence:
        _score_sequence_ensemble(members, sampler, num_episodes, settings, curves)
    elif FLAGS.ensemble:
        _score_ensemble(members, sampler, n_way, num_episodes, settings)
    if FLAGS.plot_instances:
        _plot_instances(curves, settings)


# Sequences scored by default for MANN/LSTM checkpoints (the "at least 1000").
SEQUENCE_EPISODES = 1000


def _check_ensemble(stored, sequence):
    """Usage errors, before any compile, unless --ensemble has two or more ProtoNet runs, or
    MANN/LSTM runs of one way, that take the same images."""
    if FLAGS.method != "model" or len(stored) < 2:
        raise app.UsageError("--ensemble needs --method=model and two or more ProtoNet (or "
                             "MANN/LSTM) --checkpoint runs")
    for config in stored:
        if not sequence and config["algorithm"] != "protonet":
            raise app.UsageError(f"--ensemble is for ProtoNet or MANN/LSTM checkpoints; one is "
                                 f"{config['algorithm']}")
        if sequence and config["n_way"] != stored[0]["n_way"]:
            raise app.UsageError(f"--ensemble: the runs' outputs have {stored[0]['n_way']} and "
                                 f"{config['n_way']} classes")
        if sequence and FLAGS.n_way not in (None, config["n_way"]):
            raise app.UsageError(f"--n_way={FLAGS.n_way}, but the runs' outputs have "
                                 f"{config['n_way']} classes: leave --n_way out")
        if config.get("image_shape") != stored[0].get("image_shape"):
            raise app.UsageError(f"--ensemble: the runs take images of shapes "
                                 f"{stored[0].get('image_shape')} and {config.get('image_shape')}")


def _score_sequence_ensemble(members, sampler, num_episodes, settings, curves):
    """Each of the MANN/LSTM ``members`` (config, apply, state, checkpoint, step) and their
    ensemble (mean probability) on the sequences ``sampler`` draws, in one pass, reported with
    accuracy by instance and added to ``curves`` for --plot_instances."""
    from functional_meta import training
    try:
        views = training.sequence_views(_adapt())
    except ValueError as error:
        raise app.UsageError(f"bad flags: {error}") from None
    evaluator = training.make_sequence_ensemble_evaluator(
        [(member[0], member[1]) for member in members], jit_compile=FLAGS.jit, views=views)
    result = training.evaluate(evaluator, [member[2] for member in members], sampler,
                               num_episodes)
    common = dict(settings, method="model", bn=None, adapt=_adapt())
    for i, (config, _, _, found, step) in enumerate(members):
        prefix = f"member_{i}_"
        own = {k[len(prefix):]: v for k, v in result.items() if k.startswith(prefix)}
        _report(f"{config['algorithm']} {found} (step {step})", own,
                dict(common, algorithm=config["algorithm"], checkpoint=found, step=step))
        _report_instances(own)
        curves[f"{config['algorithm']} (step {step}) run {i + 1}"] = own
    mixed = {k: v for k, v in result.items() if not k.startswith("member_")}
    algorithms = "/".join(sorted({member[0]["algorithm"] for member in members}))
    _report(f"ensemble of {len(members)} {algorithms} checkpoints", mixed,
            dict(common, algorithm=algorithms, checkpoint=[member[3] for member in members]))
    _report_instances(mixed)
    curves[f"ensemble of {len(members)}"] = mixed


def _score_ensemble(members, sampler, n_way, num_episodes, settings):
    """Each of ``members`` (config, apply, state, checkpoint, step) and their ensemble on the
    episodes ``sampler`` draws, in one pass, reported as fm-eval reports a checkpoint."""
    from functional_meta import training
    evaluator = training.make_ensemble_evaluator(
        [(member[0], member[1]) for member in members], n_way, jit_compile=FLAGS.jit,
        bn=FLAGS.bn, adapt=_adapt())
    result = training.evaluate(evaluator, [member[2] for member in members], sampler,
                               num_episodes)
    common = dict(settings, method="model", algorithm="protonet", adapt=_adapt())
    for i, (config, _, _, found, step) in enumerate(members):
        mean, ci = result[f"member_{i}"], result[f"member_{i}_ci95"]
        _report(f"protonet {found} (step {step})", {"accuracy": mean, "accuracy_ci95": ci},
                dict(common, checkpoint=found, step=step, bn=_bn(config)))
    _report(f"ensemble of {len(members)} protonet checkpoints",
            {"accuracy": result["accuracy"], "accuracy_ci95": result["accuracy_ci95"]},
            dict(common, checkpoint=[member[3] for member in members],
                 bn=FLAGS.bn or "each run's own"))


def _sequence_checkpoints(stored):
    """Whether the checkpoints are MANN/LSTM ones (scored on sequences); mixing them with
    episodic checkpoints is a ``UsageError``."""
    kinds = {c.get("algorithm") in configs.SEQUENCE_ALGORITHMS for c in stored}
    if len(kinds) > 1:
        raise app.UsageError("--checkpoint: MANN/LSTM checkpoints are scored on sequences, other "
                             "checkpoints on support/query episodes: score them in separate calls")
    return kinds == {True}


def _instances(result):
    """The instance numbers (1-based) a sequence result holds, in order."""
    return sorted(int(k.split("_")[1]) for k in result
                  if k.startswith("instance_") and not k.endswith("_ci95"))


def _report_instances(result):
    """The accuracy at the 1st, 2nd, 3rd, 4th, 5th and 10th instance of a class (the columns of
    Santoro et al. 2016, Table 1), those the sequences have."""
    from functional_meta import sequences
    have = _instances(result)
    shown = [k for k in sequences.REPORTED_INSTANCES if k in have]
    print("  by instance: " + "  ".join(
        f"{_ordinal(k)} {result[f'instance_{k}']:.4f} ± {result[f'instance_{k}_ci95']:.4f}"
        for k in shown))


def _ordinal(k):
    return f"{k}{'th' if 10 <= k % 100 < 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def _plot_instances(curves, settings):
    """--plot_instances: accuracy against instance number, one line per checkpoint, and the CSV of it."""
    from functional_meta import plots
    path = Path(FLAGS.plot_instances)
    title = (f"{settings['n_way']} classes x {settings['k_shot']} instances, "
             f"{settings['num_episodes']} {settings['split']}-split sequences")
    plots.accuracy_by_instance(
        {name: ([r[f"instance_{k}"] for k in _instances(r)],
                [r[f"instance_{k}_ci95"] for k in _instances(r)]) for name, r in curves.items()},
        path, title=title)
    with open(path.with_suffix(".csv"), "w", newline="") as f:   # a name may hold a comma
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["model", "instance", "accuracy", "ci95"])
        for name, r in curves.items():
            writer.writerows([name, k, f"{r[f'instance_{k}']:.6f}",
                              f"{r[f'instance_{k}_ci95']:.6f}"] for k in _instances(r))
    print(f"wrote {path} and {path.with_suffix('.csv')}")


def _test_domain():
    """--test_domain in canonical spelling ('clean' when unset); ``app.UsageError`` naming it."""
    try:
        return configs.domain_names([FLAGS.test_domain or "clean"])[0]
    except ValueError as error:
        raise app.UsageError(f"--test_domain: {error}") from None


def _score_supervised(paths, stored):
    """mldg/erm checkpoints: accuracy on their run's held-out images (every class) in
    --test_domain, with the 95% interval over images."""
    if any(c.get("algorithm") not in configs.SUPERVISED_ALGORITHMS for c in stored):
        raise app.UsageError("--checkpoint: cannot score mldg/erm and episodic checkpoints in one "
                             "call")
    if FLAGS.method != "model" or getattr(FLAGS, "episodes", None):
        raise app.UsageError("mldg/erm checkpoints are scored as classifiers: no --method=nn/"
                             "class_mean, no --episodes")
    test_domain = _test_domain()
    benchmarks.start_tensorflow()
    from functional_meta import checkpoints, domains, mldg, training
    for path, config in zip(paths, stored):
        try:
            _, _, held_out = training.domain_splits(config)
        except ValueError as error:
            raise app.UsageError(f"--checkpoint {path}: its data: {error}") from None
        x, y = domains.labelled(domains.apply(held_out, test_domain, config["split_seed"]))
        learner = training.make_learner(config, jit_compile=FLAGS.jit)
        state, info, found = checkpoints.restore_state(learner, path)
        jit = FLAGS.jit if FLAGS.jit is not None else training.default_jit(config["algorithm"])
        hits = mldg.make_eval_step(learner.apply, jit)
        result = mldg.evaluate(hits, state["weights"], x, y, config["eval_batch"])
        name = f"{config['algorithm']} {found} (step {info['step']})"
        print(f"{name}: accuracy {result['accuracy']:.4f} ± {result['accuracy_ci95']:.4f} (95% "
              f"CI, {len(y)} held-out images, test domain {test_domain}, trained on "
              f"{','.join(config['domains'])})")
        if FLAGS.json:
            print(json.dumps({"name": name, "algorithm": config["algorithm"], "checkpoint": found,
                              "step": info["step"], "test_domain": test_domain,
                              "train_domains": config["domains"], "images": len(y), **result},
                             sort_keys=True))


def _save_episodes(sampler, settings, config):
    """Write the ``--num_episodes`` episodes ``sampler`` gives (those scored) to
    ``--save_episodes``, images as the source files were (``fixed_episodes.save_episodes``)."""
    from functional_meta import episodes, fixed_episodes
    try:
        prep = fixed_episodes.preprocessing(config)
    except ValueError as error:
        raise app.UsageError(f"--save_episodes: {error}") from None
    out = Path(FLAGS.save_episodes)
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    num_batches = -(-FLAGS.num_episodes // sampler.meta_batch)
    for batch in episodes.dataset(sampler, start_batch=0, num_batches=num_batches):
        keep = min(sampler.meta_batch, FLAGS.num_episodes - count)
        batch = tuple(a[:keep] for a in (x.numpy() for x in batch))
        count += len(fixed_episodes.save_episodes(out, batch, count, prep))
    (out / "episodes.json").write_text(json.dumps(dict(settings, preprocessing=prep._asdict()),
                                                  indent=1, sort_keys=True) + "\n")
    print(f"wrote {count} episodes to {out}")


def _score_fixed(paths, stored):
    """--episodes: every checkpoint (or the pixel baseline) on the fixed episodes, in order."""
    benchmarks.start_tensorflow()
    from functional_meta import checkpoints, fixed_episodes, training
    if not stored and not FLAGS.data:
        raise app.UsageError("--episodes without --checkpoint needs --data (how to preprocess "
                             "the images: omniglot inverts them)")
    read = {}

    def episodes_for(config):
        try:
            prep = fixed_episodes.preprocessing(config)
            if prep not in read:
                read[prep] = fixed_episodes.read(FLAGS.episodes, prep)
        except ValueError as error:
            raise app.UsageError(f"--episodes: {error}") from None
        return read[prep]

    lake = fixed_episodes.is_lake(FLAGS.episodes)
    if FLAGS.method != "model":
        runs = episodes_for({"data": FLAGS.data or stored[0]["data"],
                             "image_shape": (stored[0] if stored else {}).get("image_shape",
                                                                              (28, 28, 1))})
        values = fixed_episodes.score(training.pixel_evaluator(FLAGS.method), None, runs)
        _report_fixed(f"pixel {FLAGS.method}", values, runs, lake, {"method": FLAGS.method})
        return
    for path, config in zip(paths, stored):
        runs = episodes_for(config)
        way = runs[0].n_way
        learner = training.make_learner(config, jit_compile=FLAGS.jit)
        state, info, found = checkpoints.restore_state(learner, path)
        for steps in _inner_steps(config):
            evaluator = _evaluator(config, learner, steps, way,
                                   f"--episodes={FLAGS.episodes} holds {way}-way episodes")
            values = fixed_episodes.score(evaluator, state, runs)
            _report_fixed(f"{config['algorithm']} {found} (step {info['step']})", values, runs,
                          lake, dict(method="model", algorithm=config["algorithm"],
                                     checkpoint=found, step=info["step"], inner_steps=steps,
                                     bn=_bn(config), adapt=_adapt()))


def _report_fixed(name, values, runs, lake, settings):
    """Lake's runs: the error rate of each run and their mean, beside the published figures;
    other episodes: ``_report``'s line."""
    from functional_meta import fixed_episodes, training
    shots = {len(r.support_y) // r.n_way for r in runs}
    settings = dict(settings, episodes=FLAGS.episodes, n_way=runs[0].n_way,
                    k_shot=shots.pop() if len(shots) == 1 else "mixed", num_episodes=len(runs))
    if not lake:
        _report(name, training.summarize(values), settings)
        return
    rates, mean = fixed_episodes.lake_error_rates(values["accuracy"])
    steps = settings.get("inner_steps")
    how = [f"{runs[0].n_way}-way"] + ([f"{steps} inner steps"] if steps else []) \
        + ([f"{settings['bn']} batch norm"] if settings.get("bn") else [])
    print(f"{name} on Lake et al.'s {len(runs)} one-shot runs ({', '.join(how)}), error rate "
          "per run:")
    print("  " + "  ".join(f"{r.name.rsplit('/', 1)[-1]} {rate:.1f}%"
                           for r, rate in zip(runs, rates)))
    print(f"  mean error {mean:.2f}%; published: "
          + ", ".join(f"{who} {rate}%" for who, rate in fixed_episodes.LAKE_FIGURES))
    if FLAGS.json:
        print(json.dumps({**settings, "name": name, "error_rates": rates.tolist(),
                          "mean_error": mean, "runs": [r.name for r in runs]}, sort_keys=True))


def run():
    flag_groups.run_binary(main, __name__)


if __name__ == "__main__":
    run()
