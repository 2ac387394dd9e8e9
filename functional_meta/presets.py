"""The published configurations, as plain dictionaries, so nobody has to remember them.

Every preset names its algorithm family, network and episode shape; binaries start from a preset
and let any flag override a field. Values follow the papers: MAML (Finn et al. 2017, Section 5 and
its reference code), Prototypical Networks (Snell et al. 2017, Section 3), memory-augmented
networks (Santoro et al. 2016, Section 4).
"""

import math

# Fields: net ('conv4' | 'mlp'; any conv4 preset also takes 'resnet12'), channels, pool (conv4),
# image_shape, hidden (mlp), n_way, k_shot, q_query, meta_batch, inner_steps, test_inner_steps,
# inner_lr, outer_lr, loss, data.
PRESETS = {
    # MAML Omniglot 5-way: stride-2 conv4, 64 filters, meta-batch 32, one step with alpha 0.4.
    "maml_omniglot_5way": dict(
        family="maml", net="conv4", channels=64, pool="stride", image_shape=(28, 28, 1),
        n_way=5, k_shot=1, q_query=1, meta_batch=32, inner_steps=1, test_inner_steps=3,
        inner_lr=0.4, outer_lr=1e-3, loss="cross_entropy", data="omniglot"),
    # MAML Omniglot 20-way: meta-batch 16, five steps with alpha 0.1.
    "maml_omniglot_20way": dict(
        family="maml", net="conv4", channels=64, pool="stride", image_shape=(28, 28, 1),
        n_way=20, k_shot=1, q_query=1, meta_batch=16, inner_steps=5, test_inner_steps=5,
        inner_lr=0.1, outer_lr=1e-3, loss="cross_entropy", data="omniglot"),
    # MAML MiniImageNet: 84x84x3, 32 filters, max pooling, meta-batch 4, five steps (ten at test).
    "maml_miniimagenet": dict(
        family="maml", net="conv4", channels=32, pool="max", image_shape=(84, 84, 3),
        n_way=5, k_shot=1, q_query=15, meta_batch=4, inner_steps=5, test_inner_steps=10,
        inner_lr=0.01, outer_lr=1e-3, loss="cross_entropy", data="synthetic"),
    # MAML sinusoid regression: 1-40-40-1 ReLU MLP, K=10, meta-batch 25, alpha 0.01.
    "maml_sinusoid": dict(
        family="maml", net="mlp", hidden=(40, 40), image_shape=(1,), n_way=1, k_shot=10,
        q_query=10, meta_batch=25, inner_steps=1, test_inner_steps=10, inner_lr=0.01,
        outer_lr=1e-3, loss="mse", data="sinusoid"),
    # The tutorial's 784-64-64-N MLP on MNIST-shaped 5-way 5-shot tasks.
    "maml_mnist_mlp": dict(
        family="maml", net="mlp", hidden=(64, 64), image_shape=(28, 28, 1), n_way=5, k_shot=5,
        q_query=5, meta_batch=8, inner_steps=1, test_inner_steps=5, inner_lr=0.4, outer_lr=1e-3,
        loss="cross_entropy", data="mnist"),
    # ProtoNet Omniglot: max-pool conv4 embedding (64-d), 60-way 5-shot 5-query training episodes.
    "protonet_omniglot": dict(
        family="protonet", net="conv4", channels=64, pool="max", image_shape=(28, 28, 1),
        n_way=60, k_shot=5, q_query=5, meta_batch=1, outer_lr=1e-3, test_n_way=5,
        data="omniglot"),
    # ProtoNet MiniImageNet: 84x84x3, 64 filters, 30-way 1-shot 15-query training episodes.
    "protonet_miniimagenet": dict(
        family="protonet", net="conv4", channels=64, pool="max", image_shape=(84, 84, 3),
        n_way=30, k_shot=1, q_query=15, meta_batch=1, outer_lr=1e-3, test_n_way=5,
        data="synthetic"),
    # MANN (Santoro et al. 2016): LSTM controller of 200 units, LRUA memory 128 x 40 with 4 read
    # heads; sequences of 5 classes x 10 instances (50 steps) of 20x20 images, one-hot labels,
    # meta-batch 16. n_way = classes, k_shot = instances per class; no query set. Adam (optimizer
    # 'rmsprop': the paper's) with gradients clipped to norm clip_norm; gamma is the usage decay;
    # write: what a head writes, 'add' (a vector of its own) or 'key' (the paper's equation 7);
    # weight_decay: the optimiser's decoupled decay of the kernels (none in the paper).
    "mann_omniglot_5way": dict(
        family="mann", net="mann", image_shape=(20, 20, 1), n_way=5, k_shot=10, q_query=0,
        meta_batch=16, controller=200, memory_slots=128, memory_size=40, read_heads=4,
        gamma=0.95, write="add", optimizer="adam", clip_norm=10.0, outer_lr=1e-3,
        weight_decay=0.0,
        loss="cross_entropy", data="omniglot"),
    # The paper's second setting: 15 classes x 10 instances (150 steps), one-hot labels here.
    "mann_omniglot_15way": dict(
        family="mann", net="mann", image_shape=(20, 20, 1), n_way=15, k_shot=10, q_query=0,
        meta_batch=16, controller=200, memory_slots=128, memory_size=40, read_heads=4,
        gamma=0.95, write="add", optimizer="adam", clip_norm=10.0, outer_lr=1e-3,
        weight_decay=0.0,
        loss="cross_entropy", data="omniglot"),
    # Domain generalisation (MLDG, ERM) on Rotated MNIST as DomainBed (Gulrajani & Lopez-Paz 2021)
    # trains it: a classifier of the n_way = 10 digits, batch_size = 64 images per training domain
    # a step, Adam 1e-3. MLDG: virtual SGD step inner_lr, meta-test weight beta (DomainBed's
    # default 1), meta_test domains per step. conv4 stands in for DomainBed's MNIST CNN;
    # eval_batch images per scoring batch (batch norm uses each batch's statistics).
    "rotated_mnist": dict(
        family="supervised", net="conv4", channels=64, pool="stride", image_shape=(28, 28, 1),
        n_way=10, batch_size=64, inner_lr=0.1, beta=1.0, meta_test=1, eval_batch=500,
        outer_lr=1e-3, loss="cross_entropy", data="mnist"),
    # MAML-RL 2D navigation (Finn et al. 2017, sec. 5.3 and its code): Gaussian policy, two hidden
    # layers of 100 ReLUs; 20 tasks x 20 trajectories of 100 steps; one vanilla policy-gradient
    # step with alpha 0.1; TRPO with max KL 0.01; discount 0.99 (functional_meta.maml_rl).
    "maml_rl_navigation": dict(
        family="maml_rl", net="policy_mlp", hidden=(100, 100), env="navigation2d", horizon=100,
        trajectories=20, meta_batch=20, inner_steps=1, test_inner_steps=3, inner_lr=0.1,
        discount=0.99, outer="trpo", max_kl=0.01, outer_lr=0.01, estimator="exact"),
}


# The convolutional networks of image configs. A config's ``channels`` sets the width: conv4's
# filters per block; ResNet-12's first block, the others in MetaOptNet's proportions
# (``resnet12_widths``).
IMAGE_NETS = ("conv4", "resnet12")


def resnet12_widths(channels):
    """ResNet-12's block widths for ``channels``: ``(c, 5c // 2, 5c, 10c)``, MetaOptNet's and
    TADAM's (64, 160, 320, 640) for 64; 32 gives a narrower (32, 80, 160, 320)."""
    return (channels, 5 * channels // 2, 5 * channels, 10 * channels)


def get(name, **overrides):
    """A copy of preset ``name`` with ``overrides`` applied (``None`` values are ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    config = dict(PRESETS[name])
    unknown = set(overrides) - set(config) - {"hidden", "channels", "pool", "test_n_way"}
    if unknown:
        raise ValueError(f"preset {name!r} has no field(s) {sorted(unknown)}")
    config.update({k: v for k, v in overrides.items() if v is not None})
    return config


def network(config, n_way=None):
    """``(init, apply)`` for a preset's network; ``n_way`` overrides the head size (``None`` keeps
    the config's; ProtoNet configs have no head)."""
    from functional_meta import mann, nets      # here: the presets stay free of TensorFlow
    way = n_way or config["n_way"]
    front = dict(encoder_channels=config.get("encoder_channels", 0),
                 freeze_encoder=config.get("freeze_encoder", False),
                 pixels=config.get("pixels", True))          # the input side of both
    if config["net"] == "mann":
        return mann.mann(way, tuple(config["image_shape"]), controller=config["controller"],
                         memory_slots=config["memory_slots"], memory_size=config["memory_size"],
                         read_heads=config["read_heads"], gamma=config["gamma"],
                         write=config.get("write", "key"),
                         head_inputs=config.get("head_inputs", False), **front)
    if config["net"] == "lstm":
        return mann.lstm(way, tuple(config["image_shape"]), units=config["controller"], **front)
    if config["net"] in IMAGE_NETS:
        head = None if config["family"] == "protonet" else way
        shape = tuple(config["image_shape"])
        if config["net"] == "resnet12":
            return nets.resnet12(head, widths=resnet12_widths(config["channels"]), in_shape=shape)
        return nets.conv4(head, channels=config["channels"], in_shape=shape, pool=config["pool"])
    if config["net"] == "mlp":
        shape = tuple(config["image_shape"])
        if config["family"] == "protonet":      # an embedding: the last hidden layer, no head
            return nets.mlp([math.prod(shape), *config["hidden"]], in_shape=shape)
        out = 1 if config.get("loss") == "mse" else way
        return nets.mlp([math.prod(shape), *config["hidden"], out], in_shape=shape)
    raise ValueError(f"unknown net {config['net']!r}; choose one of {list(IMAGE_NETS) + ['mlp']}")
