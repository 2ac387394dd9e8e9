"""Meta-train MAML, FOMAML, Meta-SGD, MAML++ LSLR, ProtoNet or a memory-augmented network on any
data source.

Hyper-parameters default to a published preset (--preset; chosen from --algorithm and --data when
omitted); any flag given overrides the preset's value. Progress lines every --log_every steps,
validation on held-out classes every --val_every steps, TensorBoard summaries, checkpoints and
config.json in --out_dir; --resume continues a stopped run exactly.

Examples:
  fm-train --algorithm=protonet --data=omniglot --data_path=images_background.zip --rotations \\
      --n_way=60 --k_shot=1 --out_dir=/tmp/protonet
  fm-train --algorithm=maml --data=sinusoid --steps=70000 --out_dir=/tmp/maml_sinusoid --plots
  fm-train --algorithm=mann --data=omniglot --data_path=images_background.zip --rotations \\
      --steps=10000 --out_dir=/tmp/mann               # 5 classes x 10 instances, 20x20 images
  fm-train --algorithm=maml --lr_mode=lslr --data=synthetic --out_dir=/tmp/lslr
  fm-train --algorithm=maml_rl --env=navigation2d --outer=trpo --steps=200 --out_dir=/tmp/nav
"""

import functools
import importlib
import os
import sys
import tempfile
import time

from absl import app, flags, logging

import benchmarks
from benchmarks import flag_groups, rl_run, run_flags
from functional_meta import configs, presets       # both free of TensorFlow, as this module

FLAGS = flags.FLAGS

flags.adopt_module_key_flags(run_flags)

# Algorithm and hyper-parameters (None = the preset's value).
flags.DEFINE_enum("algorithm", None, list(configs.ALGORITHMS),
                  "Required. maml (second order), fomaml (first order), metasgd (learned per-weight inner "
                  "rates), protonet, or pretrain (the sinusoid baseline: regress on the mixture of "
                  "tasks, fine-tune at test time); mldg (Li et al. 2018) or erm: a classifier of "
                  "the data's n_way classes trained across --domains (domain generalisation); "
                  "mann (memory-augmented network with least-recently-used memory access, "
                  "Santoro et al. 2016) or lstm (its baseline without memory): sequences of "
                  "--n_way classes x --k_shot instances, each label given one step late. "
                  "imaml: implicit MAML (Rajeswaran et al. 2019; --proximal_lambda, --cg_steps). "
                  "maml_rl: MAML for reinforcement learning on --env tasks (rollouts, inner "
                  "policy-gradient steps and the TRPO/Adam meta-update in one compiled step); "
                  "pretrain_rl: its baseline, one policy trained on all tasks jointly.")
flags.DEFINE_enum("preset", None, sorted(presets.PRESETS), "Published configuration the other "
                  "flags start from; default: chosen from --algorithm and --data.")
flags.DEFINE_enum("lr_mode", None, list(configs.LR_MODES), "MAML inner learning rates: fixed, "
                  "metasgd (per weight) or lslr (MAML++ per layer and step); default fixed.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and the training episodes (validation "
                     "episodes use seed + 1).", lower_bound=0)
flags.DEFINE_enum("metric", "euclidean", ["euclidean", "cosine"], "ProtoNet distance.")
flags.DEFINE_integer("meta_batch", None, "Tasks (episodes) per step.", lower_bound=1)
flags.DEFINE_integer("test_inner_steps", None, "MAML inner steps at validation.", lower_bound=1)
flags.DEFINE_integer("test_n_way", None, "Ways of the validation episodes (ProtoNet).",
                     lower_bound=1)
flags.DEFINE_float("inner_lr", None, "MAML inner learning rate (initial value when learned).")
flags.DEFINE_float("outer_lr", None, "Learning rate of the meta-update (Adam's; with "
                   "--optimizer=rmsprop default 1e-4, the MANN paper's).")
flags.DEFINE_enum("optimizer", None, ["adam", "rmsprop"], "MANN/LSTM: the optimiser, adam (the "
                  "presets') or rmsprop (Santoro et al. 2016: decay 0.95, momentum 0.9). Other "
                  "algorithms use Adam.")
flags.DEFINE_float("weight_decay", None, "MANN/LSTM: decoupled weight decay (AdamW's: each "
                   "step also moves a kernel by -rate * this * its value; not the biases, not a "
                   "frozen encoder); 0 = none, the presets'.", lower_bound=0.0)
flags.DEFINE_integer("lr_decay_every", 0, "Multiply the meta-update's Adam rate (--outer_lr) by "
                     "--lr_decay every this many steps, counted by the optimiser inside the "
                     "compiled step (so --resume continues the schedule); 0 = constant rate. The "
                     "ProtoNet paper halves it every 2000 episodes: --lr_decay_every=2000.",
                     lower_bound=0)
flags.DEFINE_float("lr_decay", 0.5, "Factor in (0, 1] applied to the rate every --lr_decay_every "
                   "steps.", lower_bound=0, upper_bound=1)
flags.DEFINE_integer("augment_shift", 0, "Image data: move every image of the training episodes "
                     "by its own random offset of up to this many pixels per axis (zero fill); "
                     "validation and test episodes are never shifted. 0 = no augmentation.",
                     lower_bound=0)
flags.DEFINE_float("augment_rotate", 0.0, "Image data: also rotate every training image about its "
                   "centre by a random angle of up to this many degrees either way (bilinear, "
                   "zero fill); 0 = none.", lower_bound=0)
flags.DEFINE_float("augment_scale", 0.0, "Image data: also scale every training image by a random "
                   "factor in [1 - this, 1 + this]; 0 = none.", lower_bound=0)
flags.DEFINE_enum("backbone", None, list(presets.IMAGE_NETS), "Image network of the episodic "
                  "learners (stored as config.json's net): conv4 (the preset's) or resnet12 "
                  "(ResNet-12 of TADAM/MetaOptNet: four residual blocks of three 3x3 "
                  "convolutions, batch norm, leaky ReLU, max pooling; a 640-d embedding of "
                  "28x28 images at --channels=64; ProtoNet's embedding or MAML's body with a "
                  "dense head). mann/lstm: conv4 adds a convolutional encoder (four blocks of "
                  "3x3 convolution, ReLU and 2x2 max pooling of --channels filters, default 32; "
                  "no batch norm, so each image is encoded on its own) whose features the "
                  "controller reads beside the pixels. Default: the preset's network.")
flags.DEFINE_integer("channels", None, "Width: conv4's filters per block (e.g. 64, 128); "
                     "resnet12's first block, the blocks being (c, 5c/2, 5c, 10c): 64 gives the "
                     "published 64-160-320-640, 32 a narrower 32-80-160-320. Default: the "
                     "preset's (64 for Omniglot).", lower_bound=1)
flags.DEFINE_enum("pool", None, ["stride", "max"], "conv4 downsampling.")
flags.DEFINE_string("encoder_from", None, "mann/lstm with --backbone=conv4: start the encoder "
                    "from a ProtoNet run's conv4 embedding (its folder, whose best or else latest "
                    "checkpoint is read, or a checkpoint prefix), each batch norm fixed to the "
                    "statistics of this run's training images and folded into its convolution. "
                    "Its width is the encoder's (--channels, if given, must match). The ProtoNet "
                    "must have trained on images of this run's size and on none of this run's "
                    "validation or test classes.")
flags.DEFINE_bool("freeze_encoder", False, "mann/lstm with --backbone=conv4: keep the encoder "
                  "as it starts (e.g. from --encoder_from); only the controller, memory heads "
                  "and output layer train.")
flags.DEFINE_bool("pixels", True, "mann/lstm with --backbone=conv4: the controller reads the "
                  "pixels beside the encoder's features; --nopixels, the features alone (with "
                  "an encoder from --encoder_from).")
flags.DEFINE_bool("head_inputs", False, "mann: the memory heads also read each step's image "
                  "input (what the controller reads of it: pixels and/or encoder features) "
                  "through a kernel of their own, so the keys that read and write the memory need "
                  "not pass through the LSTM; not in the paper (docs/mann.md).")
flags.DEFINE_integer("image_size", None, "Image data (--data=omniglot, omniglot_tfds, folder, "
                     "synthetic): train on SxS images, area-resized from the source, with the "
                     "preset's channels, e.g. 56 for Omniglot at twice the presets' 28x28 "
                     "(stored in config.json's image_shape; fm-eval scores at that size). The "
                     "smallest size is the network's: 16 for max pooling's four halvings. "
                     "Default: the preset's image_shape.", lower_bound=1)
flags.DEFINE_list("hidden", None, "MLP hidden layer widths, e.g. 40,40.")
flags.DEFINE_list("domains", None, "Image styles to train across (functional_meta.domains "
                  "names: clean, rotate:DEGREES, dilate:R, erode:R, blur:SIGMA, noise:STD, invert, "
                  "elastic:ALPHA:SIGMA, joined by '+' to compose), e.g. clean,rotate:45,blur:1. "
                  "protonet/maml: every training and validation episode is drawn within one of "
                  "them. mldg/erm: each gets its own share of every class's images (20% of it "
                  "for validation); one more share is held out for fm-eval --test_domain. "
                  "Default: clean.")
flags.DEFINE_integer("batch_size", None, "mldg/erm: images per training domain per step "
                     "(preset rotated_mnist: 64).", lower_bound=1)
flags.DEFINE_float("beta", None, "mldg: weight of the meta-test loss (preset: 1).", lower_bound=0)
flags.DEFINE_integer("meta_test", None, "mldg: training domains that are meta-test in a step, "
                     "chosen at random each step; the rest are meta-train (preset: 1). "
                     "--inner_lr is the virtual step's rate.", lower_bound=1)

# The run.
flags.DEFINE_string("out_dir", None, "Required. Folder for checkpoints, config.json, history.jsonl, "
                    "TensorBoard summaries and plots.")
flags.DEFINE_integer("steps", 1000, "Total training steps (meta-batches).", lower_bound=1)
flags.DEFINE_bool("resume", False, "Continue from the newest checkpoint in --out_dir.")
flags.DEFINE_bool("deterministic", False, "tf.config.experimental.enable_op_determinism(): with "
                  "it a resumed run repeats an uninterrupted one's losses exactly.")
flags.DEFINE_integer("log_every", 100, "Steps between progress lines and summaries.",
                     lower_bound=1)
flags.DEFINE_integer("val_every", 500, "Steps between validations (0 = never).", lower_bound=0)
flags.DEFINE_integer("val_episodes", 200, "Episodes per validation.", lower_bound=1)
flags.DEFINE_integer("checkpoint_every", 500, "Steps between checkpoints.", lower_bound=1)
flags.DEFINE_integer("keep", 5, "Latest checkpoints kept (the best is kept apart).", lower_bound=1)
flags.DEFINE_enum("strategy", "none", ["none", "mirrored", "multiworker"],
                  "Data parallelism over the meta-batch: none (one device), mirrored (every GPU of "
                  "this host, or every logical CPU, see --logical_cpus), multiworker (hosts listed "
                  "in the TF_CONFIG environment variable; the chief writes checkpoints).")
flags.DEFINE_integer("logical_cpus", 0, "Without GPUs: split the CPU into this many logical devices "
                     "so --strategy=mirrored has that many replicas (0 = leave the CPU whole).",
                     lower_bound=0)
flags.DEFINE_integer("task_chunk", None, "MAML-style algorithms: compute the meta-gradient for "
                     "this many tasks at a time, in a loop inside the compiled step (same "
                     "result). Must divide the meta-batch (per replica with --strategy). Default: "
                     "for conv4 on a CPU, chunks of at most 80 Omniglot-sized images, whose "
                     "activations stay in the caches; otherwise the whole meta-batch.",
                     lower_bound=1)
flags.DEFINE_float("proximal_lambda", None, "imaml: lambda of each task's proximal inner problem "
                   "L(w) + lambda/2 |w - theta|^2, solved by --inner_steps gradient steps of "
                   "--inner_lr (keep inner_lr * lambda < 2 for a stable inner loop); default 2.",
                   lower_bound=0.0)
flags.DEFINE_integer("cg_steps", None, "imaml: conjugate-gradient iterations that solve "
                     "(I + H/lambda) g = grad L_query for the implicit meta-gradient; default 5.",
                     lower_bound=1)
# MAML-RL (--algorithm=maml_rl|pretrain_rl): --env, --horizon, --trajectories, --discount,
# --outer, --max_kl, --estimator (benchmarks.rl_run).
rl_run.define_rl_flags()
flags.adopt_module_key_flags(rl_run)
flags.DEFINE_bool("plots", False, "Draw PNG figures in --out_dir at the end (needs matplotlib): "
                  "learning curves; sinusoid fits; ProtoNet embeddings at the kept checkpoints; "
                  "with --domains, domains.png: the same images in every training domain.")



@flags.multi_flags_validator(["backbone", "pool", "algorithm", "preset", "data"],
                             "--backbone: conv4 or resnet12, on a preset with an image network, "
                             "or conv4 for mann/lstm "
                             "(--pool is conv4's only)")
def _check_backbone(values):
    """Before TensorFlow loads: --backbone against the preset (--preset, or the one that
    --algorithm and --data choose) and --pool."""
    if values["backbone"] is None or values["algorithm"] is None:    # main asks for it
        return True
    if values["algorithm"] in configs.RL_ALGORITHMS:
        raise flags.ValidationError(f"--backbone: --algorithm={values['algorithm']} trains a "
                                    "policy MLP, not an image network")
    preset = values["preset"] or configs.default_preset(values["algorithm"], values["data"])
    try:
        configs.check_backbone(values["backbone"], preset, values["pool"])
    except ValueError as error:
        raise flags.ValidationError(f"--backbone: {error}") from None
    return True


@flags.multi_flags_validator(["optimizer", "algorithm"],
                             "--optimizer applies to --algorithm=mann or lstm only")
def _check_optimizer(values):
    return (values["optimizer"] is None
            or values["algorithm"] in (None, *configs.SEQUENCE_ALGORITHMS))


@flags.multi_flags_validator(["weight_decay", "algorithm"],
                             "--weight_decay applies to --algorithm=mann or lstm only")
def _check_weight_decay(values):
    return (values["weight_decay"] is None
            or values["algorithm"] in (None, *configs.SEQUENCE_ALGORITHMS))


@flags.multi_flags_validator(["encoder_from", "freeze_encoder", "pixels", "algorithm", "backbone"],
                             "--encoder_from, --freeze_encoder and --nopixels need "
                             "--algorithm=mann or lstm and --backbone=conv4")
def _check_encoder_from(values):
    return not (values["encoder_from"] or values["freeze_encoder"] or not values["pixels"]) or (
        values["algorithm"] is None
        or values["algorithm"] in configs.SEQUENCE_ALGORITHMS and values["backbone"] == "conv4")


@flags.multi_flags_validator(["head_inputs", "algorithm"],
                             "--head_inputs needs --algorithm=mann (the LSTM has no memory heads)")
def _check_head_inputs(values):
    return not values["head_inputs"] or values["algorithm"] in (None, "mann")


def config_from_flags():
    """The training config (preset + flags + data settings); ``app.UsageError`` on bad input."""
    hidden = None
    if FLAGS.hidden:
        try:
            hidden = [int(h) for h in FLAGS.hidden]
        except ValueError:
            raise app.UsageError(f"--hidden must be integers, got {FLAGS.hidden}") from None
    overrides = dict(n_way=FLAGS.n_way, k_shot=FLAGS.k_shot, q_query=FLAGS.q_query,
                     meta_batch=FLAGS.meta_batch, inner_steps=FLAGS.inner_steps,
                     test_inner_steps=FLAGS.test_inner_steps, test_n_way=FLAGS.test_n_way,
                     inner_lr=FLAGS.inner_lr, outer_lr=FLAGS.outer_lr, channels=FLAGS.channels,
                     optimizer=FLAGS.optimizer, weight_decay=FLAGS.weight_decay,
                     pool=FLAGS.pool, hidden=hidden, batch_size=FLAGS.batch_size,
                     beta=FLAGS.beta, meta_test=FLAGS.meta_test)
    try:
        config = configs.make_config(FLAGS.algorithm, preset=FLAGS.preset, data=FLAGS.data,
                                     lr_mode=FLAGS.lr_mode, metric=FLAGS.metric,
                                     lr_decay_every=FLAGS.lr_decay_every, lr_decay=FLAGS.lr_decay,
                                     augment_shift=FLAGS.augment_shift,
                                     augment_rotate=FLAGS.augment_rotate,
                                     augment_scale=FLAGS.augment_scale,
                                     domains=FLAGS.domains, proximal_lambda=FLAGS.proximal_lambda,
                                     cg_steps=FLAGS.cg_steps, bn=FLAGS.bn or "transductive",
                                     backbone=FLAGS.backbone,
                                     episodes_within_group=FLAGS.episodes_within_group,
                                     **overrides)
    except ValueError as error:
        raise app.UsageError(f"bad flags: {error}") from None
    if config["data"] in ("omniglot", "mnist", "folder") and not FLAGS.data_path:
        raise app.UsageError(f"--data={config['data']} needs --data_path")
    config.update(data_path=configs.absolute_data_path(FLAGS.data_path), rotations=FLAGS.rotations,
                  train_groups=FLAGS.train_groups, val_groups=FLAGS.val_groups,
                  test_groups=FLAGS.test_groups, exclude_groups=FLAGS.exclude_groups,
                  split=[float(f) for f in FLAGS.split], val_fraction=FLAGS.val_fraction,
                  split_seed=FLAGS.split_seed, seed=FLAGS.seed)
    if FLAGS.image_size is not None:
        config["image_shape"] = sized_image_shape(config, FLAGS.image_size)
    if FLAGS.freeze_encoder:
        config["freeze_encoder"] = True
    if not FLAGS.pixels:
        config["pixels"] = False
    if FLAGS.head_inputs:
        config["head_inputs"] = True
    return config


# Images per training class whose statistics fix --encoder_from's batch norms.
STATISTICS_IMAGES = 4


def pretrained_encoder(path, config, train_classes, held_out):
    """The weights of ``--encoder_from`` for this run's encoder (``nets.fold_batch_norm`` over
    ``STATISTICS_IMAGES`` images of each of ``train_classes``); sets ``config``'s
    ``encoder_channels`` and ``encoder_from``. ``app.UsageError`` naming the flag for a run that
    is not a max-pooling conv4 ProtoNet at this image size, or that trained on any class of the
    ``held_out`` splits."""
    import numpy as np
    from functional_meta import checkpoints, nets, training
    try:
        source, _ = configs.load_config(path)
    except ValueError as error:
        raise app.UsageError(f"--encoder_from: {error}") from None
    if (source["algorithm"], source.get("net"), source.get("pool")) != ("protonet", "conv4", "max"):
        raise app.UsageError(f"--encoder_from={path} is a {source['algorithm']} run with net "
                             f"{source.get('net')!r}; it must be a ProtoNet run with conv4 and "
                             "max pooling")
    if list(source["image_shape"]) != list(config["image_shape"]):
        raise app.UsageError(f"--encoder_from={path} trained on images of shape "
                             f"{source['image_shape']}, this run's are {config['image_shape']} "
                             "(ProtoNet's --image_size must match)")
    if FLAGS.channels is not None and FLAGS.channels != source["channels"]:
        raise app.UsageError(f"--channels={FLAGS.channels} but --encoder_from={path} has "
                             f"{source['channels']} channels; leave out --channels")
    source_train = training.load_splits(source)[0]
    seen = set(zip(source_train.groups, source_train.names))
    leaked = [name for split in held_out
              for name in set(zip(split.groups, split.names)) & seen]
    if leaked:
        raise app.UsageError(f"--encoder_from={path} trained on {len(leaked)} classes this run "
                             f"holds out for validation or test (e.g. {sorted(leaked)[0]})")
    learner = training.make_learner(source)
    state, _, found = checkpoints.restore_state(learner, path)
    images = np.concatenate([x[:STATISTICS_IMAGES] for x in train_classes.images]) / 255.0
    config.update(encoder_channels=source["channels"], encoder_from=str(found))
    logging.info("encoder from %s, batch norm fixed to %d training images", found, len(images))
    return nets.fold_batch_norm(state["weights"], images.astype(np.float32))


def _starting_from(encoder, init, optimizer):
    """``init(seed)`` of a MANN or LSTM learner with ``encoder`` in place of its encoder."""
    from functional_meta import mann

    def start(seed):
        weights = init(seed)["weights"]
        return mann.init_state([*encoder, *weights[len(encoder):]], optimizer)

    return start


# Sources that data.load resizes to a requested size (MNIST's images come at 28x28 as stored).
RESIZED_SOURCES = ("omniglot", "omniglot_tfds", "folder", "synthetic")


def sized_image_shape(config, size):
    """``config``'s ``image_shape`` at ``size`` x ``size`` (channels kept); ``app.UsageError``
    naming ``--image_size`` for data without resizable images, or a size the network's
    downsampling cannot take (with the smallest it can)."""
    shape = tuple(config.get("image_shape", ()))
    if config["data"] not in RESIZED_SOURCES or len(shape) != 3:
        raise app.UsageError(f"--image_size resizes the images of --data="
                             f"{', '.join(RESIZED_SOURCES)}; --data={config['data']} "
                             f"(image_shape {list(shape)}) has none to resize")

    def fits(side):
        try:
            presets.network(dict(config, image_shape=(side, side, shape[2])))
            configs.check_config(dict(config, image_shape=(side, side, shape[2])))
        except ValueError:
            return False
        return True

    if not fits(size):
        smallest = next((s for s in range(size + 1, 4 * size + 64) if fits(s)), None)
        allowed = f"at least {smallest}" if smallest else "larger"
        shift = f" and --augment_shift={config['augment_shift']}" if config["augment_shift"] else ""
        pool = f" (pool={config['pool']!r})" if "pool" in config else ""
        raise app.UsageError(f"--image_size={size} is too small for net={config['net']}{pool}"
                             f"{shift}: allowed {allowed}")
    return (size, size, shape[2])


def _draw(out_dir, config, learner, checkpoints_kept, held_out, style_examples=None):
    from functional_meta import checkpoints, plots, training
    # mldg/erm draw no episodes: no way and shot in the legends (an empty config).
    legend = {"config": {}} if training.is_supervised(config) else {}
    drawn = [plots.learning_curves(os.path.join(out_dir, training.HISTORY_FILE),
                                   os.path.join(out_dir, "learning_curves.png"),
                                   title=f"{config['algorithm']} ({config['preset']})", **legend)]
    if config["data"] == "sinusoid":
        state, _, _ = checkpoints.restore_state(learner, out_dir)
        curves = training.sinusoid_curves(learner, state, steps=(1, 10), k_shot=config["k_shot"])
        drawn.append(plots.sinusoid(curves, os.path.join(out_dir, "sinusoid.png"),
                                    title=f"{config['algorithm']}, K={config['k_shot']}"))
    if config["algorithm"] == "protonet" and held_out is not None and len(held_out):
        panels = []
        for path in checkpoints_kept:
            state, info, _ = checkpoints.restore_state(learner, path)
            x, labels = training.embed_classes(learner, state, held_out)
            panels.append((f"step {info['step']}", x, labels))
        drawn.append(plots.embeddings(panels, os.path.join(out_dir, "embeddings.png")))
    if config["domains"] != ["clean"] and style_examples is not None:
        from functional_meta import domains
        drawn.append(domains.plot_examples(style_examples, config["domains"],
                                           os.path.join(out_dir, "domains.png")))
    for path in drawn:
        logging.info("wrote %s", path)


def check_out_dir(path):
    """``app.UsageError`` naming ``--out_dir`` unless the folder exists or can be made, and a file
    can be written in it: found before any work, not at the first checkpoint."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise app.UsageError(f"--out_dir={path} is not a folder this process can write to: "
                             f"{error.strerror or error}") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    for name in ("algorithm", "out_dir"):           # checked here, not by a flag validator, so
        if not FLAGS[name].value:                   # other binaries can share this process
            raise app.UsageError(f"--{name} is required")
    check_out_dir(FLAGS.out_dir)
    if FLAGS.plots:                                 # at the start, not after training
        try:
            importlib.import_module("matplotlib")
        except ImportError:
            raise app.UsageError("--plots needs matplotlib: pip install 'functional_meta[plot]' "
                                 "(or pip install matplotlib)") from None
    if FLAGS.algorithm in configs.RL_ALGORITHMS:        # tasks from an environment, no data
        if FLAGS.image_size is not None:
            raise app.UsageError(f"--image_size resizes images; --algorithm={FLAGS.algorithm} "
                                 "trains on an environment's states")
        rl_run.rl_config_from_flags(FLAGS.algorithm, FLAGS.preset)    # bad flags: before TF
        return rl_run.train_main(benchmarks.start_tensorflow())
    tf = benchmarks.start_tensorflow()
    from benchmarks import runner
    from functional_meta import checkpoints, distribute, training
    # First TensorFlow call: multi-worker collectives must be configured before any other.
    strategy = runner.make_strategy(FLAGS.strategy, FLAGS.logical_cpus)
    config = config_from_flags()
    if checkpoints.has_checkpoints(FLAGS.out_dir) and not FLAGS.resume:
        raise app.UsageError(f"--out_dir={FLAGS.out_dir} already holds checkpoints: pass --resume "
                             "to continue that run, or choose another --out_dir")
    if FLAGS.resume and not checkpoints.has_checkpoints(FLAGS.out_dir):
        raise app.UsageError(f"--resume: --out_dir={FLAGS.out_dir} holds no checkpoint to "
                             "continue; leave out --resume to start a new run there")
    supervised = training.is_supervised(config)
    try:
        if supervised:                  # a fixed label set: every class, in every domain
            train_parts, val_parts, style_examples = training.domain_splits(config)
            train_classes = val_classes = test_classes = None
        else:
            train_classes, val_classes, test_classes = training.load_splits(config)
            style_examples = train_classes
    except ValueError as error:
        raise app.UsageError(f"bad data flags (--data/--data_path/--*_groups/--split): {error}") \
            from None
    val_n_way = config.get("test_n_way") or config["n_way"]
    if train_classes is not None:
        try:
            training.check_split(train_classes, "meta-training", config["n_way"], config["k_shot"],
                                 config["q_query"])
            if FLAGS.val_every:
                training.check_split(val_classes, "validation (--val_groups/--val_fraction/"
                                     "--split; or --val_every=0)", val_n_way, config["k_shot"],
                                     config["q_query"])
        except ValueError as error:
            raise app.UsageError(f"bad flags: {error}") from None
        logging.info("classes: %d meta-train, %d validation, %d test", len(train_classes),
                     len(val_classes), len(test_classes))
    if FLAGS.deterministic:
        tf.config.experimental.enable_op_determinism()
    encoder = FLAGS.encoder_from and pretrained_encoder(FLAGS.encoder_from, config, train_classes,
                                                        [val_classes, test_classes])
    try:
        learner = training.make_learner(config, jit_compile=FLAGS.jit, strategy=strategy,
                                        task_chunk=FLAGS.task_chunk)
    except ValueError as error:
        raise app.UsageError(f"bad flags (--strategy/--meta_batch/--task_chunk): {error}") from None
    if encoder:
        learner = learner._replace(init=_starting_from(encoder, learner.init, config["optimizer"]))
    validate = None
    if supervised:
        from functional_meta import domains
        try:
            sampler = domains.DomainBatchSampler(train_parts, config["batch_size"], FLAGS.seed)
        except ValueError as error:
            raise app.UsageError(f"bad flags (--batch_size/--domains): {error}") from None
        if FLAGS.val_every:
            validate = training.supervised_validator(learner, val_parts, FLAGS.jit)
    else:
        try:
            sampler = training.make_sampler(
                train_classes, n_way=config["n_way"], k_shot=config["k_shot"],
                q_query=config["q_query"], meta_batch=config["meta_batch"], seed=FLAGS.seed,
                domain_names=config["domains"], sequences=training.is_sequence(config),
                within_group=config["episodes_within_group"], **configs.augment_options(config))
        except ValueError as error:
            raise app.UsageError(f"bad flags: {error}") from None
    if FLAGS.val_every and not supervised:
        val_sampler = training.make_sampler(val_classes, n_way=val_n_way, k_shot=config["k_shot"],
                                            q_query=config["q_query"],
                                            meta_batch=min(training.EVAL_BATCH,
                                                           FLAGS.val_episodes),
                                            seed=FLAGS.seed + 1, domain_names=config["domains"],
                                            sequences=training.is_sequence(config))
        try:
            evaluator = training.make_evaluator(config, learner.apply, jit_compile=FLAGS.jit)
        except ValueError as error:
            raise app.UsageError(f"bad flags: {error}") from None
        validate = functools.partial(training.evaluate, evaluator, sampler=val_sampler,
                                     num_episodes=FLAGS.val_episodes)   # validate(state)
    logging.info("training %s (%s) for %d steps into %s", config["algorithm"], config["preset"],
                 FLAGS.steps, FLAGS.out_dir)
    start = time.perf_counter()
    try:
        with distribute.checkpoint_directory(strategy or tf.distribute.get_strategy(),
                                             FLAGS.out_dir) as write_dir:
            result = training.train(learner, sampler, out_dir=write_dir, steps=FLAGS.steps,
                                    seed=FLAGS.seed, log_every=FLAGS.log_every,
                                    checkpoint_every=FLAGS.checkpoint_every, keep=FLAGS.keep,
                                    validate=validate, val_every=FLAGS.val_every,
                                    resume=FLAGS.resume, restore_from=FLAGS.out_dir)
    except checkpoints.TrainingStopped as error:        # a non-finite or diverging loss
        sys.exit(f"fm-train: stopped: {error}")
    except ValueError as error:          # e.g. an existing run without --resume
        sys.exit(f"fm-train: {error}")
    elapsed = time.perf_counter() - start
    best = "none (no validation ran)" if result.best is None else result.best
    done = "trained" if result.losses else "already trained"       # a finished run resumed
    print(f"{done} {config['algorithm']} to step {result.step} in {elapsed:.1f} s; "
          f"best validation: {best}; last checkpoint: {result.checkpoint}")
    if FLAGS.plots:
        kept = checkpoints.Checkpoints(FLAGS.out_dir, learner.init(0), keep=None).candidates()
        _draw(FLAGS.out_dir, config, learner, list(reversed(kept)),
              test_classes if test_classes is not None and len(test_classes) else val_classes,
              style_examples)


def run():
    flag_groups.run_binary(main, __name__)


if __name__ == "__main__":
    run()
