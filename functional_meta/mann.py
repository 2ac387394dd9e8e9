"""Memory-augmented neural network (MANN) with least-recently-used access (LRUA), and an LSTM
baseline, as pure functions over explicit weights and explicit state.

Santoro, Bartunov, Botvinick, Wierstra & Lillicrap (2016), "One-shot learning with
memory-augmented neural networks" (arXiv:1605.06065). An LSTM controller reads each image ``x_t``
with the previous step's label ``y_{t-1}`` (one-hot; zeros at the first step) and the previous
reads ``r_{t-1}``, and classifies ``x_t`` from its state and the new reads. Per step, for each
read head ``h`` with key ``k_t^h`` (the paper's equation numbers):

- (6) write weights ``w^w_t = sigmoid(alpha) w^r_{t-1} + (1 - sigmoid(alpha)) w^lu_{t-1}``;
- (7) ``M_t(i) = M_{t-1}(i) + sum_h w^w_t^h(i) a_t^h``, after the least-used slot of
  ``w^u_{t-1}`` has been set to zero; ``a_t^h`` is the key ``k_t^h`` itself as the paper writes
  it (``write='key'``), or a separate add vector (``write='add'``, the presets' choice);
- (1) cosine similarity ``K(k, M(i))``, (2) read weights ``softmax_i(beta K(k_t^h, M_t(i)))``,
  (3) reads ``r_t^h = sum_i w^r_t^h(i) M_t(i)``;
- (4) usage ``w^u_t = gamma w^u_{t-1} + sum_h (w^r_t^h + w^w_t^h)``;
- (5) ``w^lu_t(i) = 1`` for the ``n`` least-used slots of ``w^u_t`` (``n`` = read heads), else 0.

Where the paper leaves a detail open, this module chooses:

- Key strength ``beta = softplus(.)`` per head (the Neural Turing Machine's sharpening, Graves
  et al. 2014), starting at ``INITIAL_STRENGTH``; the paper's equation (2) is the case
  ``beta = 1``.
- Keys are ``tanh`` of a linear map of the controller output; the gate ``alpha`` is a linear
  map too, one per head. ``write='add'`` writes ``a_t^h = tanh`` of another linear map instead of
  the key, as the Neural Turing Machine's add vector: a slot just written with the key ``k_t^h``
  has cosine similarity ~1 with that same key, so the read that follows the write tends to
  return the current step's own key rather than an earlier instance's slot (docs/mann.md
  measures both).
- Memory starts at ``MEMORY_INIT`` in every entry (a zero slot has no cosine similarity), usage
  and read weights at zero, reads and the LSTM state at zero.
- ``m(w^u_t, n)`` of equation (5): exactly the ``n`` least-used slots get a one (ties go to the
  lower index), so every head's write shares the same ``n`` slots.
- "The least used memory location" that is zeroed before writing: the single slot of smallest
  ``w^u_{t-1}`` (the first of equation 5's ``n``).
- The output layer reads ``[h_t, r_t]`` (the paper feeds the reads to the classifier and back to
  the controller); the LSTM's forget-gate bias starts at 1, kernels Glorot-uniform.

Usage::

    init, apply = mann.mann(n_classes=5, image_shape=(20, 20, 1))
    weights = init(0)
    logits = apply(weights, (images, previous_labels))  # [B, T, 5]; images [B, T, 20, 20, 1]

``previous_labels [B, T]`` holds ``labels[:, t - 1]`` at step ``t`` and -1 at step 0
(``functional_meta.sequences.SequenceSampler`` gives it); -1 encodes as the zero vector.
"""

import math
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from functional_meta import optim

# Initial value of every memory entry (the paper does not give one).
MEMORY_INIT = 1e-6
# The key strength beta before training (the bias of its softplus): reads start sharp enough to
# pick out a slot among 128 (beta = 1, the paper's equation 2, spreads them nearly evenly).
INITIAL_STRENGTH = 10.0
# Added to the squared norms in the cosine similarity, so an empty slot has similarity ~0 and a
# finite gradient.
COSINE_EPSILON = 1e-8


class MemoryState(NamedTuple):
    """LRUA memory state of a batch: ``memory [B, N, M]``, ``usage`` ``w^u [B, N]``,
    ``read_weights`` ``w^r [B, R, N]`` of the last step."""
    memory: tf.Tensor
    usage: tf.Tensor
    read_weights: tf.Tensor


def initial_memory(batch, slots, size, heads, dtype=tf.float32):
    """The memory state before the first step: entries ``MEMORY_INIT``, usage and reads zero."""
    return MemoryState(tf.fill([batch, slots, size], tf.constant(MEMORY_INIT, dtype)),
                       tf.zeros([batch, slots], dtype), tf.zeros([batch, heads, slots], dtype))


def least_used(usage, n):
    """Equation (5): ``w^lu [B, N]`` with ones at the ``n`` smallest entries of ``usage [B, N]``
    (ties to the lower index) and the one-hot ``[B, N]`` of the smallest.

    From ranks by pairwise comparison (slot ``i``'s rank counts the slots used less, or as much
    with a lower index), ``[B, N, N]`` elementwise work that needs no sort.
    """
    slots = usage.shape[-1]
    before = tf.range(slots)[:, None] < tf.range(slots)[None, :]           # [j, i]: j < i
    less = tf.logical_or(usage[:, :, None] < usage[:, None, :],
                         tf.logical_and(tf.equal(usage[:, :, None], usage[:, None, :]), before))
    rank = tf.reduce_sum(tf.cast(less, tf.int32), axis=1)                   # [B, N]
    return (tf.stop_gradient(tf.cast(rank < n, usage.dtype)),
            tf.stop_gradient(tf.cast(tf.equal(rank, 0), usage.dtype)))


def cosine_similarity(keys, memory):
    """Equation (1): ``K(k^h, M(i))`` ``[B, R, N]`` of ``keys [B, R, M]`` and
    ``memory [B, N, M]``."""
    dots = tf.matmul(keys, memory, transpose_b=True)
    key_norms = tf.sqrt(tf.reduce_sum(tf.square(keys), -1) + COSINE_EPSILON)       # [B, R]
    slot_norms = tf.sqrt(tf.reduce_sum(tf.square(memory), -1) + COSINE_EPSILON)    # [B, N]
    return dots / (key_norms[:, :, None] * slot_norms[:, None, :])


def lrua_step(state, keys, adds, gates, strengths, gamma):
    """One LRUA write-then-read: ``(new_state, reads [B, R, M])``.

    ``keys [B, R, M]`` (the reads' keys), ``adds [B, R, M]`` (what each head writes: ``keys``
    for the paper's equation 7), ``gates [B, R]`` (the logits ``alpha`` of equation 6),
    ``strengths [B, R]`` (``beta >= 0``). Equations (5), (6), (7), (1)-(3), (4), in that order
    (see the module docstring); ``gamma`` is the usage decay.
    """
    heads = keys.shape[1]
    lu, least = least_used(state.usage, heads)                               # from w^u_{t-1}
    gate = tf.sigmoid(gates)[:, :, None]
    write = gate * state.read_weights + (1.0 - gate) * lu[:, None, :]         # (6) [B, R, N]
    memory = (state.memory * (1.0 - least)[:, :, None]                        # (7)
              + tf.matmul(write, adds, transpose_a=True))
    read = tf.nn.softmax(strengths[:, :, None] * cosine_similarity(keys, memory))  # (1), (2)
    reads = tf.matmul(read, memory)                                          # (3) [B, R, M]
    usage = gamma * state.usage + tf.reduce_sum(read + write, axis=1)         # (4)
    return MemoryState(memory, usage, read), reads


def _glorot(seed, index, shape, dtype):
    limit = math.sqrt(6.0 / (shape[0] + shape[1]))
    return tf.random.stateless_uniform(shape, seed=[seed, index], minval=-limit, maxval=limit,
                                       dtype=dtype)


def _check(seed):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def _check_sizes(**sizes):
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_encoder(channels):
    if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels < 0:
        raise ValueError(f"encoder_channels must be 0 (pixels) or a positive integer, got "
                         f"{channels!r}")


def _head_bias(heads, size, dtype):
    """Per head ``[key and add vector (size), gate, strength]``: zeros, but the strength starts
    at ``INITIAL_STRENGTH``."""
    raw = math.log(math.expm1(INITIAL_STRENGTH))                   # softplus(raw) = strength
    one = tf.concat([tf.zeros([size + 1], dtype), tf.constant([raw], dtype)], 0)
    return tf.tile(one, [heads])


def _lstm_bias(units, dtype):
    """Gates ``[i, f, g, o]``; the forget gate's bias starts at 1."""
    return tf.concat([tf.zeros([units], dtype), tf.ones([units], dtype),
                      tf.zeros([2 * units], dtype)], 0)


def _lstm_cell(pre, c):
    """LSTM update from the gates' pre-activations ``pre [B, 4H]`` and the cell ``c [B, H]``."""
    i, f, g, o = tf.split(pre, 4, axis=-1)
    c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
    return tf.sigmoid(o) * tf.tanh(c), c


def _inputs(w_in, images, previous_labels, n_classes):
    """The input part of every step's gate pre-activations, ``[T, B, 4H]`` (time-major), from the
    flattened images and one-hot previous labels, as one product for the whole sequence."""
    images = tf.convert_to_tensor(images)
    b, t = images.shape[0], images.shape[1]
    x = tf.concat([tf.reshape(images, [b, t, -1]),
                   tf.one_hot(previous_labels, n_classes, dtype=images.dtype)], -1)
    x = tf.transpose(x, [1, 0, 2])                                           # [T, B, D]
    return tf.reshape(tf.matmul(tf.reshape(x, [t * b, -1]), w_in), [t, b, -1])


WRITES = ("add", "key")
# Blocks of the optional convolutional encoder (3x3 convolution, bias, ReLU, 2x2 max pool): four
# take 20x20 images to 1x1, as conv4 takes 28x28 ones.
ENCODER_BLOCKS = 4
# Added to the variance of the encoder's features before normalising them.
LAYER_NORM_EPSILON = 1e-6


def _feature_count(image_shape, channels):
    """The encoder's features per image: ``channels`` per output pixel (none for ``channels=0``)."""
    if not channels:
        return 0
    h, w = image_shape[0], image_shape[1]
    for _ in range(ENCODER_BLOCKS):
        h, w = h // 2, w // 2
    if not h or not w:
        raise ValueError(f"image_shape={tuple(image_shape)} is too small for the encoder's "
                         f"{ENCODER_BLOCKS} 2x2 poolings (at least {2 ** ENCODER_BLOCKS} pixels a "
                         "side)")
    return h * w * channels


def _encoder_init(seed, channels, in_channels, dtype):
    """He-uniform kernels ``[3, 3, in, channels]`` and zero biases, block by block."""
    weights = []
    for block in range(ENCODER_BLOCKS if channels else 0):
        c_in = in_channels if block == 0 else channels
        limit = math.sqrt(6.0 / (9 * c_in))                # ReLU layers keep their scale
        weights += [tf.random.stateless_uniform([3, 3, c_in, channels], seed=[seed, 10 + block],
                                                minval=-limit, maxval=limit, dtype=dtype),
                    tf.zeros([channels], dtype)]
    return weights


def _input_kernel(seed, pixels, d, n_classes, width, dtype):
    """``w_in [d + n_classes, width]``, Glorot-uniform but zero in the rows of the encoder's
    features (``d - pixels`` of them, after ``pixels`` rows of pixels): the model starts as the
    one reading pixels alone, and the features enter as training finds them useful. Without
    pixels (``pixels=0``) every row is Glorot-uniform."""
    kernel = _glorot(seed, 0, [d + n_classes, width], dtype)
    if not pixels:
        return kernel
    keep = tf.concat([tf.ones([pixels], dtype), tf.zeros([d - pixels], dtype),
                      tf.ones([n_classes], dtype)], 0)
    return kernel * keep[:, None]


def _front(image_shape, n_classes, width, encoder_channels, freeze_encoder, pixels):
    """The input side that ``mann`` and ``lstm`` share: ``(init, pre_inputs, n, d)`` with
    ``init(seed, dtype) -> [*encoder, w_in]`` (``n`` tensors) and ``pre_inputs(those weights,
    (images, previous_labels)) -> [T, B, width]``, every step's input product (no bias); with
    ``with_images=True`` also what the controller reads of each image, ``[B, T, d]``.
    ``freeze_encoder``: no gradient reaches the encoder's weights; ``pixels=False``: the
    controller reads the encoder's features alone."""
    _check_encoder(encoder_channels)
    if not (pixels or encoder_channels):
        raise ValueError("pixels=False needs an encoder (encoder_channels > 0): the controller "
                         "would read no image")
    n_pixels = math.prod(image_shape) if pixels else 0
    d = n_pixels + _feature_count(image_shape, encoder_channels)     # image inputs per step
    n = 2 * ENCODER_BLOCKS + 1 if encoder_channels else 1

    def init(seed, dtype):
        return [*_encoder_init(seed, encoder_channels, image_shape[-1], dtype),
                _input_kernel(seed, n_pixels, d, n_classes, width, dtype)]

    def pre_inputs(weights, episode, with_images=False):
        images, previous_labels = episode
        encoder = [tf.stop_gradient(w) for w in weights[:-1]] if freeze_encoder else weights[:-1]
        images = _encode(encoder, tf.convert_to_tensor(images), pixels)
        out = _inputs(weights[-1], images, previous_labels, n_classes)
        return (out, images) if with_images else out

    return init, pre_inputs, n, d


def _encode(weights, images, pixels=True):
    """The controller's image input ``[B, T, D]``: each image of ``images [B, T, H, W, C]``
    flattened (unless ``pixels=False``), then (with encoder weights) its features, normalised
    to zero mean and unit variance over the features of that image (layer norm without gain and
    bias, which ``w_in`` supplies). No batch norm, so no step's input depends on another image.
    Why the pixels too, and why ``_input_kernel`` starts the features' rows at zero: from
    untrained features the MANN did not leave its chance plateau (docs/design.md)."""
    b, t = images.shape[0], images.shape[1]
    flat = tf.reshape(images, [b, t, -1])
    if not weights:
        return flat
    x = tf.reshape(images, [b * t, *images.shape[2:]])
    for kernel, bias in zip(weights[::2], weights[1::2]):
        x = tf.nn.max_pool2d(tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "SAME") + bias), 2, 2, "VALID")
    x = tf.reshape(x, [b, t, -1])
    mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
    features = (x - mean) * tf.math.rsqrt(variance + LAYER_NORM_EPSILON)
    return tf.concat([flat, features], -1) if pixels else features


def image_inputs(weights, images, encoder_channels=0, pixels=True):
    """What a MANN's or LSTM's controller reads of each image of ``images [B, T, H, W, C]``,
    ``[B, T, D]``: the pixels and/or the features of the encoder at the head of ``weights``
    (``encoder_channels`` and ``pixels`` as the network was built with)."""
    encoder = weights[:2 * ENCODER_BLOCKS] if encoder_channels else []
    return _encode(list(encoder), tf.convert_to_tensor(images), pixels)


def mann(n_classes, image_shape, controller=200, memory_slots=128, memory_size=40, read_heads=4,
         gamma=0.95, write="add", encoder_channels=0, freeze_encoder=False, pixels=True,
         head_inputs=False):
    """``(init, apply)`` of the MANN: LSTM controller of ``controller`` units and an LRUA memory of
    ``memory_slots`` x ``memory_size`` with ``read_heads`` heads (the paper: 200, 128 x 40, 4).
    ``write``: what a head writes, ``'add'`` (a vector of its own) or ``'key'`` (its key, the
    paper's equation 7). ``encoder_channels``: 0, the controller reads the pixels (the paper);
    ``c > 0``, also the features of a convolutional encoder of ``ENCODER_BLOCKS`` blocks of ``c``
    filters (conv4 without batch norm), which may generalise to unseen alphabets better than
    pixel weights learnt from few characters (docs/mann.md); ``freeze_encoder`` keeps it as
    initialised (e.g. from a ProtoNet embedding, ``nets.fold_batch_norm``); ``pixels=False``
    leaves out the pixels, the controller reading the features alone. ``head_inputs``: the heads
    also read the step's image input (pixels and/or features, what the controller reads of it)
    through a kernel of their own, so a key need not pass through the LSTM to match what was
    written; not in the paper (docs/mann.md).

    ``init(seed, dtype=tf.float32)`` -> weights ``[*encoder, w_in (D + n_classes, 4H),
    w_rec (H + R*M, 4H), b (4H,), w_head (H, R*(A + 2)), b_head, w_out (H + R*M, n_classes),
    b_out]``, then ``w_direct (D, R*(A + 2))`` with ``head_inputs``: ``encoder`` the encoder's
    kernels and biases (none with ``encoder_channels=0``), ``D`` the pixels
    (``prod(image_shape)``) plus the encoder's features; ``w_head`` gives each head's key (and add
    vector: ``A = 2M``; with ``write='key'`` ``A = M``), gate and strength.
    ``apply(weights, (images [B, T, *image_shape], previous_labels [B, T]))`` -> logits
    ``[B, T, n_classes]``, the whole sequence in one ``tf.scan``.
    """
    _check_sizes(n_classes=n_classes, controller=controller, memory_slots=memory_slots,
                 memory_size=memory_size, read_heads=read_heads)
    if read_heads > memory_slots:
        raise ValueError(f"read_heads={read_heads} must not exceed memory_slots={memory_slots}")
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma (usage decay) must be in [0, 1], got {gamma!r}")
    if write not in WRITES:
        raise ValueError(f"write must be one of {list(WRITES)}, got {write!r}")
    h, r, m = controller, read_heads, memory_size
    a = 2 * m if write == "add" else m                     # key and add vector, or the key alone
    front_init, front, n_front, d = _front(image_shape, n_classes, 4 * h, encoder_channels,
                                           freeze_encoder, pixels)

    def init(seed, dtype=tf.float32):
        _check(seed)
        return [*front_init(seed, dtype),
                _glorot(seed, 1, [h + r * m, 4 * h], dtype), _lstm_bias(h, dtype),
                _glorot(seed, 2, [h, r * (a + 2)], dtype), _head_bias(r, a, dtype),
                _glorot(seed, 3, [h + r * m, n_classes], dtype), tf.zeros([n_classes], dtype)
                ] + ([_glorot(seed, 4, [d, r * (a + 2)], dtype)] if head_inputs else [])

    def apply(weights, episode):
        w_rec, b, w_head, b_head, w_out, b_out = weights[n_front:n_front + 6]
        pre_inputs, images = front(weights[:n_front], episode, with_images=True)
        pre_inputs += b
        batch, dtype = pre_inputs.shape[1], pre_inputs.dtype
        # Each step's direct contribution to its heads, [T, B, R*(A + 2)]; or none.
        scanned = (pre_inputs, tf.einsum("btd,dk->tbk", images, weights[-1])) if head_inputs \
            else (pre_inputs,)

        def step(carry, inputs):
            hidden, cell, reads, memory = carry
            pre = inputs[0] + tf.matmul(tf.concat([hidden, reads], -1), w_rec)
            hidden, cell = _lstm_cell(pre, cell)
            head = tf.matmul(hidden, w_head) + b_head
            if head_inputs:
                head += inputs[1]
            head = tf.reshape(head, [batch, r, a + 2])
            vectors = tf.tanh(head[..., :a])
            keys, adds = vectors[..., :m], vectors[..., a - m:]    # the same for write='key'
            gates, strengths = head[..., a], tf.nn.softplus(head[..., a + 1])
            memory, new_reads = lrua_step(MemoryState(*memory), keys, adds, gates, strengths,
                                          gamma)
            return hidden, cell, tf.reshape(new_reads, [batch, r * m]), tuple(memory)

        zeros = tf.zeros([batch, h], dtype)
        start = (zeros, zeros, tf.zeros([batch, r * m], dtype),
                 tuple(initial_memory(batch, memory_slots, m, r, dtype)))
        hidden, _, reads, _ = tf.scan(step, scanned, initializer=start)     # [T, B, ...]
        logits = tf.matmul(tf.concat([hidden, reads], -1), w_out) + b_out
        return tf.transpose(logits, [1, 0, 2])

    return init, apply


def lstm(n_classes, image_shape, units=200, encoder_channels=0, freeze_encoder=False,
         pixels=True):
    """``(init, apply)`` of the baseline: the same LSTM (``units`` cells) on the same inputs
    (image, through the same optional encoder, and previous label), no memory. Weights
    ``[*encoder, w_in (D + n_classes, 4H), w_rec (H, 4H), b (4H,), w_out (H, n_classes), b_out]``;
    ``apply`` as ``mann``'s."""
    _check_sizes(n_classes=n_classes, units=units)
    h = units
    front_init, front, n_front, _ = _front(image_shape, n_classes, 4 * h, encoder_channels,
                                           freeze_encoder, pixels)

    def init(seed, dtype=tf.float32):
        _check(seed)
        return [*front_init(seed, dtype),
                _glorot(seed, 1, [h, 4 * h], dtype),
                _lstm_bias(h, dtype), _glorot(seed, 3, [h, n_classes], dtype),
                tf.zeros([n_classes], dtype)]

    def apply(weights, episode):
        w_rec, b, w_out, b_out = weights[n_front:]
        pre_inputs = front(weights[:n_front], episode) + b

        def step(carry, pre_input):
            hidden, cell = carry
            return _lstm_cell(pre_input + tf.matmul(hidden, w_rec), cell)

        zeros = tf.zeros([pre_inputs.shape[1], h], pre_inputs.dtype)
        hidden, _ = tf.scan(step, pre_inputs, initializer=(zeros, zeros))
        return tf.transpose(tf.matmul(hidden, w_out) + b_out, [1, 0, 2])

    return init, apply


# ----------------------------------------------------------------------------------------------
# Training and evaluation steps


def loss_and_logits(apply, weights, batch):
    """Mean cross-entropy over every step of every episode of ``batch = (images,
    previous_labels, labels)``, and the logits ``[B, T, C]``."""
    images, previous_labels, labels = batch
    logits = apply(weights, (images, previous_labels))
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
    return loss, logits


def _optimizer(name):
    if name not in optim.OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(optim.OPTIMIZERS)}, got {name!r}")
    return optim.OPTIMIZERS[name]


def init_state(weights, optimizer="adam"):
    """Training state ``{'weights', 'opt'}``; ``optimizer`` names an ``optim.OPTIMIZERS`` entry
    (``'adam'``, or ``'rmsprop'`` as the paper trained)."""
    weights = [tf.convert_to_tensor(w) for w in weights]
    return {"weights": weights, "opt": _optimizer(optimizer)[0](weights)}


def make_train_step(apply, lr=1e-3, clip_norm=None, jit_compile=True, optimizer="adam",
                    weight_decay=0.0, frozen=0):
    """``step(state, batch) -> (state, {'loss', 'accuracy'})``: loss over the whole sequence, its
    gradient through the ``tf.scan`` (backpropagation through time), clipping to global norm
    ``clip_norm`` (``None``: none) and an ``optimizer`` update (``'adam'`` or ``'rmsprop'``,
    ``functional_meta.optim``), in one ``tf.function(jit_compile=...)``. ``lr`` is a number or
    an ``optim`` schedule. ``weight_decay``: decoupled decay (``optim.decoupled_weight_decay``)
    of every kernel (rank >= 2, not the biases) but the first ``frozen`` weights (a frozen
    encoder's)."""
    update = _optimizer(optimizer)[1]
    if weight_decay:
        update = optim.decoupled_weight_decay(
            update, weight_decay, lambda i, w: i >= frozen and w.shape.rank >= 2)

    @tf.function(jit_compile=jit_compile, autograph=False)
    def step(state, batch):
        weights = list(state["weights"])
        with tf.GradientTape() as tape:
            tape.watch(weights)
            loss, logits = loss_and_logits(apply, weights, batch)
        grads = tape.gradient(loss, weights,                  # zeros for a frozen encoder
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        grads = optim.clip_by_global_norm(grads, clip_norm)
        weights, opt = update(grads, weights, state["opt"], lr)
        correct = tf.equal(tf.argmax(logits, -1, output_type=batch[2].dtype), batch[2])
        return ({"weights": weights, "opt": opt},
                {"loss": loss, "accuracy": tf.reduce_mean(tf.cast(correct, loss.dtype))})

    return step


def make_eval_step(apply, jit_compile=True):
    """``eval_step(weights, batch) -> (predictions [B, T] int32, loss [B], probabilities
    [B, T, C])``, compiled once per batch shape; ``functional_meta.sequences.accuracy_by_instance``
    scores the predictions, and an ensemble of sequence models averages the probabilities."""

    @tf.function(jit_compile=jit_compile, autograph=False)
    def eval_step(weights, batch):
        images, previous_labels, labels = batch
        logits = apply(list(weights), (images, previous_labels))
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
        return (tf.argmax(logits, -1, output_type=labels.dtype), tf.reduce_mean(losses, axis=1),
                tf.nn.softmax(logits))

    return eval_step
