"""Analytic floating-point operation counts of the networks and of one training step.

What is counted: the multiply-adds of convolutions and dense layers (matrix products), two FLOPs
each (one multiply, one add), as a dense-matmul FLOP/s figure counts them. Not counted: batch norm,
ReLU, pooling, biases, losses, softmax, ProtoNet's prototype means and distances, the optimiser
update and MAML's weight updates. These are elementwise or tiny next to the products, so the count
is a slight underestimate of the arithmetic and a fair numerator for "achieved FLOP/s" compared
with a matmul benchmark.

Step counts are built from the per-example forward cost ``F = sum_l f_l`` of the layers and the
cost ``f_1`` of the layers that read the network's input (the first layer; for ResNet-12 also the
first block's shortcut), with the reverse-mode rule that is exact for products: each product
``y = x W`` gives, in the backward pass, one product of the same size per input that needs a
gradient (``dx = dy W^T`` and ``dW = x^T dy``). The network's input (images, sinusoid inputs) is a
constant, so those layers' ``dx`` is never needed and is not counted (compiled graphs prune it).

- forward: ``F``;
- gradient with respect to the weights (forward + backward): ``3F - f_1``;
- second order, differentiating a whole inner step (its forward and backward, ``3F - f_1``) once
  more: ``6F - 4 f_1`` more (every product of the inner step gets a product per input that
  depends on the weights), so a second-order inner step costs ``9F - 5 f_1`` in all.

A MAML step with ``S`` inner steps, per task, with support cost ``F_s`` and query cost ``F_q``:

- second order: ``S (9 F_s - 5 f_1s) + n_q (3 F_q - f_1q)``;
- first order (no gradient flows back into the inner steps):
  ``S (3 F_s - f_1s) + n_q (3 F_q - f_1q)``;
- ``n_q = S`` with the multi-step loss (a query loss after every inner step), else 1;
- recomputation (``recompute=True``) is not counted: these are model FLOPs, the products the
  algorithm needs once, so a step that recomputes shows its extra cost as lower achieved FLOP/s.

A ProtoNet step embeds every support and query image once and differentiates: ``3F - f_1`` per
image.

Counts are per meta-batch: per-example costs times ``meta_batch * n_way * k_shot`` support and
``meta_batch * n_way * q_query`` query examples. ``config`` is a preset dictionary
(``functional_meta.presets``). ``tests/test_benchmarks.py`` checks the counts against the products
XLA compiles for MAML and ProtoNet steps.
"""

import math

from functional_meta import presets     # free of TensorFlow, as this module


def conv4_layers(in_shape, channels, pool="stride", n_way=None, blocks=4):
    """Forward FLOPs per image of each product in ``nets.conv4``: the ``blocks`` 3x3 convolutions
    ('SAME' padding: ``2 * 9 * C_in * C_out`` per output pixel, padded taps included), then the
    dense head if ``n_way``."""
    h, w, c_in = in_shape
    layers = []
    for _ in range(blocks):
        if pool == "stride":  # stride-2 convolution: output ceil(h / 2)
            h, w = -(-h // 2), -(-w // 2)
            layers.append(2 * 9 * c_in * channels * h * w)
        else:                 # stride-1 convolution at full size, then 2x2 max pooling
            layers.append(2 * 9 * c_in * channels * h * w)
            h, w = h // 2, w // 2
        c_in = channels
    if n_way is not None:
        layers.append(2 * h * w * channels * n_way)
    return layers


def resnet12_layers(in_shape, widths, n_way=None):
    """Forward FLOPs per image of each product in ``nets.resnet12``, block by block: the three 3x3
    convolutions at the block's input size ('SAME', stride 1: ``2 * 9 * C_in * C_out`` per pixel),
    then the 1x1 shortcut (``2 * C_in * C_out`` per pixel); 2x2 pooling (floored) after each block;
    then the dense head if ``n_way``."""
    h, w, c_in = in_shape
    layers = []
    for width in widths:
        pixels = h * w
        layers += [2 * 9 * c_in * width * pixels, 2 * 9 * width * width * pixels,
                   2 * 9 * width * width * pixels, 2 * c_in * width * pixels]
        h, w, c_in = h // 2, w // 2, width
    if n_way is not None:
        layers.append(2 * h * w * c_in * n_way)
    return layers


def mlp_layers(sizes):
    """Forward FLOPs per example of each dense layer of ``nets.mlp(sizes)``: ``2 d_in d_out``."""
    return [2 * d_in * d_out for d_in, d_out in zip(sizes[:-1], sizes[1:])]


def network_layers(config):
    """Per-layer forward FLOPs per example of a preset's network, as ``presets.network`` builds it:
    MAML networks end in an ``n_way`` head (one output for regression), ProtoNet's are embeddings
    (a ProtoNet MLP's embedding is its last hidden layer)."""
    head = None if config["family"] == "protonet" else config["n_way"]
    if config["net"] == "conv4":
        return conv4_layers(tuple(config["image_shape"]), config["channels"], config["pool"], head)
    if config["net"] == "resnet12":
        return resnet12_layers(tuple(config["image_shape"]),
                               presets.resnet12_widths(config["channels"]), head)
    if config["net"] == "mlp":
        sizes = [math.prod(config["image_shape"]), *config["hidden"]]
        if head is not None:
            sizes.append(1 if config.get("loss") == "mse" else config["n_way"])
        return mlp_layers(sizes)
    raise ValueError(f"unknown net {config['net']!r}; choose 'conv4', 'resnet12' or 'mlp'")


def input_layers(config):
    """``f_1``: forward FLOPs per example of the products that read the network's input (their
    input gradients are never computed): the first layer, and ResNet-12's first shortcut."""
    layers = network_layers(config)
    return layers[0] + (layers[3] if config["net"] == "resnet12" else 0)


def forward(config):
    """Forward FLOPs per example (image or sinusoid input) of the network."""
    return sum(network_layers(config))


def gradient(config):
    """FLOPs per example of a forward and backward pass to the weights: ``3F - f_1``."""
    return 3 * forward(config) - input_layers(config)


def maml_step(config, *, first_order=False, multi_step_loss=False):
    """FLOPs of one MAML meta-training step on ``config['meta_batch']`` tasks (module docstring)."""
    total, first = forward(config), input_layers(config)
    steps = config["inner_steps"]
    grad = 3 * total - first                       # one forward + backward, per example
    inner = grad if first_order else grad + 6 * total - 4 * first
    queries = steps if multi_step_loss else 1
    support = config["n_way"] * config["k_shot"]
    query = config["n_way"] * config["q_query"]
    return config["meta_batch"] * (steps * inner * support + queries * grad * query)


def protonet_step(config):
    """FLOPs of one ProtoNet training step: every support and query image embedded and
    differentiated once (``3F - f_1`` each)."""
    images = config["meta_batch"] * config["n_way"] * (config["k_shot"] + config["q_query"])
    return images * gradient(config)
