"""Pure-function networks: each constructor returns a pair ``(init, apply)``.

``init(seed, dtype=tf.float32) -> list[tf.Tensor]`` builds the weight list deterministically from an
integer seed; ``apply(weights, x) -> y`` is a pure function of its arguments. The weight list is the
whole model: nothing is hidden in objects, so a ``GradientTape`` sees every weight.

Task axis. ``x`` is either one batch ``[n, *in_shape]`` or a stack of tasks ``[T, n, *in_shape]``.
Each weight is either shared (its base shape) or per task (a leading ``T`` axis, as MAML's adapted
weights are). Batch normalisation always uses the statistics of one task's batch, never across tasks.

Initialisation: convolution and dense kernels are Glorot-uniform (as the MAML reference code's
Xavier initialisers), biases and batch-norm offsets zero, batch-norm scales one.
"""

import math

import tensorflow as tf

from functional_meta import devices

try:  # XLA's optimisation barrier and TensorFlow's test for tracing under jit_compile=True
    from tensorflow.compiler.tf2xla.python.xla import optimization_barrier as _xla_barrier
    from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext as _in_xla
except ImportError:  # a TensorFlow without them: kernel gradients take the plain product
    _xla_barrier = _in_xla = None

BN_EPSILON = 1e-3
_FUSED_DTYPES = (tf.float32, tf.float16, tf.bfloat16)


def _glorot(seed, index, shape, fan_in, fan_out, dtype):
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return tf.random.stateless_uniform(shape, seed=[seed, index], minval=-limit, maxval=limit,
                                       dtype=dtype)


def _check_seed(seed):
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def _dense(x, w, b):
    """x [..., n, d] times w [..., d, o] (w may carry a task axis), plus b [..., o]."""
    product = _task_matmul(x, w) if x.shape.rank == w.shape.rank == 3 else _matmul(x, w)
    return product + (b if b.shape.rank == 1 else b[:, None, :])


def _matmul(a, b, **options):
    """``tf.matmul(a, b, **options)`` with inputs in ``devices.compute_dtype`` (bfloat16 products
    of a float32 network under ``devices.precision('bfloat16')``), the result in ``a``'s dtype."""
    low = devices.compute_dtype(a.dtype)
    if low == a.dtype:
        return tf.matmul(a, b, **options)
    return tf.cast(tf.matmul(tf.cast(a, low), tf.cast(b, low), **options), a.dtype)


def _conv2d(x, kernel, stride, padding="SAME"):
    """``tf.nn.conv2d`` with inputs in ``devices.compute_dtype``, as ``_matmul``. An input with
    ``G`` times the kernel's input channels is a grouped convolution of ``G`` groups."""
    low = devices.compute_dtype(x.dtype)
    if low == x.dtype:
        return tf.nn.conv2d(x, kernel, stride, padding)
    return tf.cast(tf.nn.conv2d(tf.cast(x, low), tf.cast(kernel, low), stride, padding), x.dtype)


def _broadcast_source(weight):
    """The shared tensor that a per-task ``weight [T, *shape]`` was broadcast from
    (``tf.broadcast_to`` in a traced graph), or None (a per-task value, or eager execution)."""
    op = getattr(weight, "op", None)  # eager tensors have no producing op
    if op is None or op.type != "BroadcastTo" or op.inputs[0].shape != weight.shape[1:]:
        return None
    return op.inputs[0]


def _task_matmul(a, weight):
    """``a [T, R, K]`` times a per-task ``weight [T, ...]`` viewed as ``[T, K, N]``: ``[T, R, N]``.

    At MAML's first inner step every task's weights are one shared tensor broadcast to ``[T, ...]``
    (``maml.per_task``). When ``weight`` is such a broadcast, the product runs with the shared
    tensor as one ``[T*R, K] x [K, N]`` product, as does the product that gives ``a``'s gradient,
    and, through them, their second derivatives; only the gradient with respect to the tasks'
    copies stays one product per task. XLA on CPU runs one large product much faster than T small
    ones (docs/design.md, shared first-step products). The values and derivatives are those of
    ``tf.matmul``; under XLA the kernel gradients take ``_kernel_gradient``'s wide form. Eagerly
    (the float64 checks) no weight is a traced broadcast and ``tf.matmul`` runs per task;
    tests/test_maml.py checks that the paths give the same meta-gradients.
    """
    t, r, k = a.shape
    kernel = tf.reshape(weight, [t, k, -1])
    shared = _broadcast_source(weight)
    # Kernel gradients in _kernel_gradient's wide form, under XLA only: outside it the custom
    # gradients cost more than they save (docs/design.md, those gradients only under XLA).
    wide = _wide_gradients()
    if shared is None:
        return _wide_matmul(a, kernel) if wide else _matmul(a, kernel)
    shared = tf.reshape(shared, [k, -1])

    @tf.custom_gradient
    def product(a, kernel):
        def grad(dy):
            rows = tf.reshape(dy, [t * r, -1])
            da = (_input_gradient(rows, shared) if wide
                  else _matmul(rows, shared, transpose_b=True))
            return tf.reshape(da, [t, r, k]), _kernel_gradient(a, dy)
        return tf.reshape(_matmul(tf.reshape(a, [t * r, k]), shared), [t, r, -1]), grad

    return product(a, kernel)


def _kernel_gradient(a, dy):
    """A kernel's gradient ``a^T dy``: ``a [..., R, K]``, ``dy [..., R, N]`` -> ``[..., K, N]``.

    Computed as the transpose of ``dy^T a`` (``[..., N, K]``): XLA on CPU runs a product that
    contracts R into a narrow ``K x N`` output (N = 64 output channels) much slower than the wide
    ``N x K`` one (docs/design.md, wide kernel gradients). The transpose then rides in the
    consumer's elementwise kernel. XLA would fold a transpose of a product back into the narrow
    product, so an optimisation barrier stands between them; it is an identity for values and
    derivatives (``_barrier``). Outside XLA (eager, ``jit_compile=False``) and for a GPU target
    (``devices.Choices.kernel_barrier``) the plain product runs.
    """
    if not _wide_gradients():
        return _matmul(a, dy, transpose_a=True)
    rank = a.shape.rank
    wide = _matmul(dy, a, transpose_a=True)
    return tf.transpose(_barrier(wide), list(range(rank - 2)) + [rank - 1, rank - 2])


def _compiling_with_xla():
    """Whether the current trace is for XLA (``tf.function(jit_compile=True)``); False eagerly."""
    return _in_xla is not None and _in_xla(tf.compat.v1.get_default_graph())


def _wide_gradients():
    """Whether kernel gradients take ``_kernel_gradient``'s wide form behind a barrier: under XLA,
    for a target that wants it (a CPU: ``devices.Choices.kernel_barrier``)."""
    return _compiling_with_xla() and devices.choices().kernel_barrier


@tf.custom_gradient
def _barrier(x):
    """XLA's optimisation barrier as an identity with an identity derivative (TensorFlow
    registers no gradient for the barrier op itself)."""
    return _xla_barrier(x)[0], lambda dy: dy


@tf.custom_gradient
def _wide_matmul(a, kernel):
    """``tf.matmul(a, kernel)`` whose kernel gradient goes through ``_kernel_gradient``."""
    def grad(dy):
        return _matmul(dy, kernel, transpose_b=True), _kernel_gradient(a, dy)
    return _matmul(a, kernel), grad


@tf.custom_gradient
def _input_gradient(dy, kernel):
    """``dy [R, N]`` times ``kernel [K, N]`` transposed, an input's gradient whose own derivative
    with respect to the kernel (MAML's second order) goes through ``_kernel_gradient``."""
    def grad(h):
        return _matmul(h, kernel), _kernel_gradient(h, dy)
    return _matmul(dy, kernel, transpose_b=True), grad


def mlp(sizes, activation=tf.nn.relu, in_shape=None):
    """Multi-layer perceptron with layer widths ``sizes`` (input first, output last).

    ``mlp([784, 64, 64, 10], in_shape=(28, 28, 1))`` is the tutorial's MNIST classifier and
    ``mlp([1, 40, 40, 1])`` the MAML sinusoid regressor. ``x`` is ``[n, *in_shape]`` or
    ``[T, n, *in_shape]`` (``in_shape`` defaults to ``(sizes[0],)``) and is flattened to ``sizes[0]``
    features. Weights: ``[w1 (d0,d1), b1 (d1,), w2 (d1,d2), b2 (d2,), ...]``.
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"mlp sizes must be at least two positive ints, got {sizes}")
    in_shape = tuple(in_shape or (sizes[0],))
    if math.prod(in_shape) != sizes[0]:
        raise ValueError(f"in_shape {in_shape} has {math.prod(in_shape)} features, sizes[0] is {sizes[0]}")

    def init(seed, dtype=tf.float32):
        _check_seed(seed)
        weights = []
        for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            weights += [_glorot(seed, i, [d_in, d_out], d_in, d_out, dtype), tf.zeros([d_out], dtype)]
        return weights

    def apply(weights, x, bn_rows=None):
        # No batch norm: every row is already scored on its own, whatever ``bn_rows`` says.
        x = tf.convert_to_tensor(x, weights[0].dtype)
        lead = x.shape.rank - len(in_shape)
        if lead not in (1, 2) or tuple(x.shape[lead:]) != in_shape:
            raise ValueError(f"mlp expects x of shape [n, *{in_shape}] or [T, n, *{in_shape}], "
                             f"got {x.shape}")
        x = tf.reshape(x, x.shape[:lead] + [sizes[0]])
        n_layers = len(sizes) - 1
        for i in range(n_layers):
            x = _dense(x, weights[2 * i], weights[2 * i + 1])
            if i < n_layers - 1:
                x = activation(x)
        return x

    return init, apply


def _same_padding(size, stride):
    out = -(-size // stride)
    total = max((out - 1) * stride + 3 - size, 0)
    return out, [total // 2, total - total // 2]


def _patches(x, stride, ones_column=False):
    """im2col of x [T, n, H, W, C] for a 3x3 'SAME' convolution: ``[T, n*H'*W', 9*C]``, H', W'.
    ``ones_column`` appends a column of ones (``9*C + 1`` columns).

    The nine shifted views are stacked on a new axis, not concatenated: the same values in the same
    order, but TensorFlow differentiates a concatenation into slices whose own derivative (second
    order, under XLA) is a chain of in-place updates of the whole patch tensor, one per view; a
    stack's derivatives are an unstack and a stack (docs/design.md, stacked patches).

    With stride 2 the views are taken from the four phases of the image (even or odd rows times
    even or odd columns, an unstack of a reshape), each view a contiguous window of one phase. The
    gradient (col2im) then sums at most four shifted windows into each phase and stacks the
    phases; strided views' gradients are zero-interleaved pads of the whole image, nine of them
    summed per input value (docs/design.md, phase windows for stride 2)."""
    t, n, h, w, c = x.shape
    out_h, pad_h = _same_padding(h, stride)
    out_w, pad_w = _same_padding(w, stride)
    if stride == 2:
        # Pad to 2 * (out + 1) rows and columns: row 2o + i of the padded image is row o + i // 2
        # of phase i % 2, for the taps i = 0, 1, 2.
        xp = tf.pad(x, [[0, 0], [0, 0], [pad_h[0], 2 * out_h + 2 - h - pad_h[0]],
                        [pad_w[0], 2 * out_w + 2 - w - pad_w[0]], [0, 0]])
        rows = tf.unstack(tf.reshape(xp, [t, n, out_h + 1, 2, out_w + 1, 2, c]), axis=3)
        phases = [tf.unstack(r, axis=4) for r in rows]      # phases[a][b]: [t, n, oh+1, ow+1, c]
        cols = [phases[i % 2][j % 2][:, :, i // 2:i // 2 + out_h, j // 2:j // 2 + out_w, :]
                for i in range(3) for j in range(3)]
    else:
        xp = tf.pad(x, [[0, 0], [0, 0], pad_h, pad_w, [0, 0]])
        cols = [xp[:, :, i:i + stride * (out_h - 1) + 1:stride,
                   j:j + stride * (out_w - 1) + 1:stride, :] for i in range(3) for j in range(3)]
    # Each view flattened to [rows, C] before the stack: the same patches, but XLA compiles a
    # stack of matrices (and its derivatives) much faster than one of 5-d views (docs/design.md,
    # flat stack).
    patches = tf.reshape(tf.stack([tf.reshape(v, [-1, c]) for v in cols], 1),
                         [t, n * out_h * out_w, 9 * c])
    if ones_column:
        patches = tf.concat([patches, tf.ones_like(patches[..., :1])], -1)
    return patches, out_h, out_w


def _row_mean(rows):
    """Mean over the middle axis of ``rows [T, R, C] -> [T, 1, C]``, as a product with a constant
    row: XLA on CPU runs these far faster than a reduction over the middle axis (docs/design.md,
    means as products with a constant row)."""
    t, r = rows.shape[:2]
    return tf.matmul(tf.fill([t, 1, r], tf.constant(1.0 / r, rows.dtype)), rows)


def _conv3x3(x, kernel, stride):
    """3x3 'SAME' convolution of x [T, n, H, W, C].

    A shared kernel [3, 3, C, O] runs as one ordinary convolution over all T*n images. A per-task
    kernel [T, 3, 3, C, O] runs, for a CPU target, as patches (im2col) times the kernel in one
    batched matrix product, which XLA compiles well on CPU and which differentiates to any order;
    for a GPU target as one grouped convolution (``_grouped_conv3x3``; ``devices.Choices.patches``).
    """
    t, n, h, w, c = x.shape
    if kernel.shape.rank == 4:
        y = _conv2d(tf.reshape(x, [t * n, h, w, c]), kernel, stride)
        return tf.reshape(y, [t, n] + y.shape[1:])
    if not devices.choices().patches:
        return _grouped_conv3x3(x, kernel, stride)
    patches, out_h, out_w = _patches(x, stride)
    y = _task_matmul(patches, kernel)
    return tf.reshape(y, [t, n, out_h, out_w, kernel.shape[-1]])


def _grouped_conv3x3(x, kernel, stride):
    """``_conv3x3`` of ``x [T, n, H, W, C]`` with a per-task ``kernel [T, 3, 3, C, O]`` as one
    grouped convolution, the usual GPU form: the tasks folded into the channels (``[n, H, W, T*C]``,
    task-major) and the kernels side by side (``[3, 3, C, T*O]``), so output channels ``t*O`` to
    ``t*O + O - 1`` see only task ``t``'s input channels (XLA's ``feature_group_count`` = T). Its
    derivatives are convolutions again, to any order."""
    t, n, h, w, c = x.shape
    o = kernel.shape[-1]
    folded = tf.reshape(tf.transpose(x, [1, 2, 3, 0, 4]), [n, h, w, t * c])
    side_by_side = tf.reshape(tf.transpose(kernel, [1, 2, 3, 0, 4]), [3, 3, c, t * o])
    y = _conv2d(folded, side_by_side, stride)
    return tf.transpose(tf.reshape(y, [n, y.shape[1], y.shape[2], t, o]), [3, 0, 1, 2, 4])


# Inputs with at most this many channels (9 * 3 = 27 patch values: grey or RGB images) take
# ``_conv_batch_norm_from_patches`` in the first block.
FEW_CHANNELS = 3


def _conv_batch_norm_from_patches(x, kernel, scale, offset, stride):
    """``_batch_norm(_conv3x3(x, kernel, stride), scale, offset)`` for an input with few channels,
    without a pass over the convolution's output for the statistics.

    The convolution is linear in its patches p (9*C values each), so the mean of output channel o
    is ``mean(p) . k_o`` and its variance ``k_o^T cov(p) k_o``, with the (9C x 9C) covariance of
    the centred patches. Batch norm then folds into the kernel and an offset: one matrix product
    makes the normalised output. The same function and derivatives as the two steps, but the wide
    first-block output is written once instead of being read and written again by batch norm and
    its gradient (docs/design.md, first-block batch norm from the patches' covariance). For a GPU
    target (no patches: ``devices.Choices.patches``) the convolution and batch norm run as such.
    """
    if not devices.choices().patches:
        return _batch_norm(_conv3x3(x, kernel, stride), scale, offset)
    t, n = x.shape[:2]
    # The offset rides as one more kernel row against a column of ones: no pass over the output.
    # That column has mean 1 and no variance: a zero kernel row leaves the statistics unchanged.
    patches, out_h, out_w = _patches(x, stride, ones_column=True)      # [T, R, 9C + 1]
    mean = _row_mean(patches)                                          # [T, 1, 9C + 1]
    centred = patches - mean
    cov = tf.matmul(centred, centred, transpose_a=True) * (1.0 / patches.shape[1])
    k = tf.reshape(kernel, list(kernel.shape[:-4]) + [-1, kernel.shape[-1]])  # [(T,) 9C, O]
    k_ones = tf.concat([k, tf.zeros_like(k[..., :1, :])], axis=-2)     # [(T,) 9C + 1, O]
    var = tf.reduce_sum(tf.matmul(cov, k_ones) * k_ones, axis=-2)      # [T, O]
    factor = tf.math.rsqrt(var + BN_EPSILON) * scale                    # [T, O]
    shift = offset - tf.matmul(mean, k_ones)[:, 0] * factor             # [T, O]
    folded = tf.concat([k * factor[:, None, :], shift[:, None, :]], axis=1)
    y = _matmul(patches, folded)
    return tf.reshape(y, [t, n, out_h, out_w, kernel.shape[-1]])


def _per_task_row(v):
    # [C] broadcasts over [T, rows, C]; a per-task [T, C] needs the middle axis.
    return v if v.shape.rank == 1 else v[:, None, :]


def _batch_norm(x, scale, offset):
    """Normalise with this batch's statistics, per task (axes n, H, W); no running averages.

    The means over rows are matrix products (``_row_mean``). The variance is the mean of squared
    deviations, not ``tf.nn.moments``, which stops the gradient through the mean inside the
    variance: first derivatives stay exact but second-order ones (MAML) break.
    """
    t, n, h, w, c = x.shape
    if t == 1 and scale.shape.rank == 1 and x.dtype in _FUSED_DTYPES:
        # One task with shared weights (ProtoNet, plain training): TensorFlow's fused kernel
        # computes the same function in one pass (oneDNN on CPU, cuDNN on GPU) and is
        # differentiable to second order. It has no float64 kernel, so float64 checks use the
        # code below, and tests/test_nets.py checks that both agree in float32.
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(tf.reshape(x, [n, h, w, c]), scale, offset,
                                                   epsilon=BN_EPSILON, is_training=True)
        return tf.reshape(y, x.shape)
    rows = tf.reshape(x, [t, n * h * w, c])
    centred = rows - _row_mean(rows)
    var = _row_mean(tf.square(centred))
    # One multiply and one add over the activations (scale folded into the [T, 1, C] factor):
    # without XLA, every broadcasting op over them is a full pass through memory.
    factor = tf.math.rsqrt(var + BN_EPSILON) * _per_task_row(scale)
    return tf.reshape(centred * factor + _per_task_row(offset), x.shape)


def _batch_norm_from_rows(x, scale, offset, bn_rows):
    """Batch norm of ``x [T, n, H, W, C]`` with the statistics of each task's first ``bn_rows``
    images only (e.g. the support set), applied to all ``n``: the other images do not move them,
    so each is normalised independently of the rest (strictly inductive scoring). The variance is
    the mean of squared deviations, differentiable to second order like ``_batch_norm``.
    ``bn_rows=None`` is ``_batch_norm``: the statistics of all ``n``."""
    if bn_rows is None:
        return _batch_norm(x, scale, offset)
    t, n, h, w, c = x.shape
    rows = tf.reshape(x[:, :bn_rows], [t, bn_rows * h * w, c])
    mean = _row_mean(rows)                                             # [T, 1, C]
    var = _row_mean(tf.square(rows - mean))
    factor = tf.math.rsqrt(var + BN_EPSILON) * _per_task_row(scale)
    out = (tf.reshape(x, [t, n * h * w, c]) - mean) * factor + _per_task_row(offset)
    return tf.reshape(out, x.shape)


# How evaluation normalises: 'transductive' takes batch norm's statistics from the images scored
# together (the query set's shape every query's features); 'support' from the support set alone.
BN_MODES = ("transductive", "support")


def support_rows(bn, n_support):
    """The ``bn_rows`` of ``apply`` for a batch whose first ``n_support`` images are the support
    set: ``n_support`` for ``bn='support'``, ``None`` (the batch's own statistics) for
    ``'transductive'``."""
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {list(BN_MODES)}, got {bn!r}")
    return n_support if bn == "support" else None


def check_bn_rows(bn_rows, n):
    """``ValueError`` unless ``bn_rows`` is ``None`` or an int in ``1..n``."""
    if bn_rows is not None and (isinstance(bn_rows, bool) or not isinstance(bn_rows, int)
                                or not 1 <= bn_rows <= n):
        raise ValueError(f"bn_rows must be None or an int in 1..{n} (the images per task), "
                         f"got {bn_rows!r}")


def _conv_batch_norm(x, kernel, scale, offset, stride, bn_rows):
    """3x3 'SAME' convolution of ``x [T, n, H, W, C]`` then batch norm (statistics of each task's
    first ``bn_rows`` images, or of all with ``None``), by the cheapest exact path: from the
    patches' covariance for inputs with at most ``FEW_CHANNELS`` channels."""
    if bn_rows is None and x.shape[-1] <= FEW_CHANNELS:
        return _conv_batch_norm_from_patches(x, kernel, scale, offset, stride)
    return _batch_norm_from_rows(_conv3x3(x, kernel, stride), scale, offset, bn_rows)


def _max_pool(x):
    """2x2 max pooling with stride 2 ('VALID': an odd last row or column is dropped) of
    ``x [T, n, H, W, C]``."""
    t, n = x.shape[:2]
    y = tf.nn.max_pool2d(tf.reshape(x, [t * n] + x.shape[2:]), 2, 2, "VALID")
    return tf.reshape(y, [t, n] + y.shape[1:])


def _image_tasks(x, dtype, in_shape, bn_rows, name):
    """``x`` as ``[T, n, *in_shape]`` of ``dtype`` and whether it came without a task axis;
    ``ValueError`` naming the network ``name`` for other image shapes or a bad ``bn_rows``."""
    x = tf.convert_to_tensor(x, dtype)
    single = x.shape.rank == 4
    if single:
        x = x[None]
    if tuple(x.shape[2:]) != tuple(in_shape):
        raise ValueError(f"{name} expects images of shape {tuple(in_shape)}, got {x.shape[2:]}")
    check_bn_rows(bn_rows, x.shape[1])
    return x, single


def _flat_output(x, weights, embedding_size, n_way, single):
    """The feature maps ``x [T, n, ...]`` flattened to ``[T, n, embedding_size]``, then with
    ``n_way`` the dense head's logits (the last two weights); no task axis if ``single``."""
    x = tf.reshape(x, [x.shape[0], x.shape[1], embedding_size])
    if n_way is not None:
        x = _dense(x, weights[-2], weights[-1])
    return x[0] if single else x


def conv4(n_way=None, channels=64, in_shape=(28, 28, 1), pool="stride", blocks=4):
    """The 4-block CNN of MAML and Prototypical Networks.

    Each block: 3x3 convolution with ``channels`` filters, batch norm (current batch statistics,
    learnable scale and offset), ReLU, then downsampling: ``pool='stride'`` makes the convolution
    stride 2 (MAML Omniglot); ``pool='max'`` keeps stride 1 and adds 2x2 max pooling (MAML
    MiniImageNet, ProtoNet). With ``n_way`` a dense head gives logits; ``n_way=None`` returns the
    flattened embedding (ProtoNet: 64 features for 28x28x1 with max pooling).

    Weights, in order: for each block ``kernel (3,3,C_in,channels), bn_scale (channels,),
    bn_offset (channels,)``; then, with a head, ``w (D, n_way), b (n_way,)`` where ``D`` is
    ``embedding_size``. There is no convolution bias: batch norm's offset makes it redundant.

    ``apply(weights, x, bn_rows=k)`` takes every batch norm's statistics from each task's first
    ``k`` images (put the support set first) and normalises all images with them, so an image
    after the first ``k`` does not affect any other's output (strictly inductive scoring). The
    default, ``None``, uses all ``n`` images of the task, as in training.
    """
    if pool not in ("stride", "max"):
        raise ValueError(f"pool must be 'stride' or 'max', got {pool!r}")
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise ValueError(f"in_shape must be (height, width, channels), got {in_shape}")
    if channels < 1 or blocks < 1 or (n_way is not None and n_way < 1):
        raise ValueError("channels, blocks and n_way must be positive")
    h, w = in_shape[0], in_shape[1]
    for _ in range(blocks):
        h, w = (-(-h // 2), -(-w // 2)) if pool == "stride" else (h // 2, w // 2)
        if h < 1 or w < 1:
            raise ValueError(f"in_shape {tuple(in_shape)} is too small for {blocks} blocks with "
                             f"pool={pool!r}: the feature map vanishes")
    embedding_size = h * w * channels

    def init(seed, dtype=tf.float32):
        _check_seed(seed)
        weights = []
        c_in = in_shape[2]
        for b in range(blocks):
            weights += [_glorot(seed, b, [3, 3, c_in, channels], 9 * c_in, 9 * channels, dtype),
                        tf.ones([channels], dtype), tf.zeros([channels], dtype)]
            c_in = channels
        if n_way is not None:
            weights += [_glorot(seed, blocks, [embedding_size, n_way], embedding_size, n_way, dtype),
                        tf.zeros([n_way], dtype)]
        return weights

    def apply(weights, x, bn_rows=None):
        x, single = _image_tasks(x, weights[0].dtype, in_shape, bn_rows, "conv4")
        for b in range(blocks):
            kernel, scale, offset = weights[3 * b:3 * b + 3]
            x = _conv_batch_norm(x, kernel, scale, offset, 2 if pool == "stride" else 1, bn_rows)
            if pool == "max":
                # Pooling before the ReLU: max and ReLU commute (both are monotone), with the same
                # gradients, and the ReLU then passes over a quarter of the values.
                x = _max_pool(x)
            x = tf.nn.relu(x)
        return _flat_output(x, weights, embedding_size, n_way, single)

    init.embedding_size = embedding_size
    return init, apply


def fold_batch_norm(weights, images):
    """conv4's weights (``pool='max'``, no head) as ``[kernel, bias]`` per block of the same
    network without batch norm: each batch norm fixed to the statistics of ``images [n, H, W, C]``
    and folded into its convolution, so that 3x3 'SAME' convolution, bias, ReLU and 2x2 max
    pooling give every image what ``apply(weights, [images; image], bn_rows=n)`` gives it. Lets a
    model that must encode each image on its own (``mann``'s encoder) start from an embedding
    trained with batch norm."""
    if not weights or len(weights) % 3:
        raise ValueError(f"fold_batch_norm takes conv4 weights without a head (3 per block), got "
                         f"{len(weights)} tensors")
    x = tf.convert_to_tensor(images, weights[0].dtype)
    folded = []
    for kernel, scale, offset in zip(weights[::3], weights[1::3], weights[2::3]):
        y = tf.nn.conv2d(x, kernel, 1, "SAME")
        mean, variance = tf.nn.moments(y, axes=[0, 1, 2])
        factor = scale * tf.math.rsqrt(variance + BN_EPSILON)
        folded += [kernel * factor, offset - mean * factor]
        x = tf.nn.max_pool2d(tf.nn.relu(y * factor + folded[-1]), 2, 2, "VALID")
    return folded


# ResNet-12's widths in MetaOptNet (Lee et al. 2019) and TADAM (Oreshkin et al. 2018).
RESNET12_WIDTHS = (64, 160, 320, 640)
LEAKY_SLOPE = 0.1


def _conv1x1(x, kernel):
    """1x1 convolution of ``x [T, n, H, W, C]`` with a shared ``[1, 1, C, O]`` or per-task
    ``[T, 1, 1, C, O]`` kernel (one matrix product per task, as ``_conv3x3``'s patches)."""
    t, n, h, w, c = x.shape
    if kernel.shape.rank == 4:
        y = _conv2d(tf.reshape(x, [t * n, h, w, c]), kernel, 1, "VALID")
        return tf.reshape(y, [t, n, h, w, kernel.shape[-1]])
    y = _task_matmul(tf.reshape(x, [t, n * h * w, c]), kernel)
    return tf.reshape(y, [t, n, h, w, kernel.shape[-1]])


def resnet12(n_way=None, widths=RESNET12_WIDTHS, in_shape=(28, 28, 1)):
    """ResNet-12, the few-shot backbone of TADAM and MetaOptNet: four residual blocks.

    Block ``b`` of width ``widths[b]``: three 3x3 'SAME' convolutions (stride 1), each followed
    by batch norm (as ``conv4``: the current batch's statistics, learnable scale and offset), the
    first two by a leaky ReLU of slope 0.1; a shortcut, 1x1 convolution and batch norm of the
    block's input, is added to the third; then leaky ReLU and 2x2 max pooling ('VALID': odd sizes
    are floored). No DropBlock or dropout: ``apply`` is a deterministic function of its inputs.
    The embedding is the flattened last map: ``widths[-1]`` features at 1x1 for 28x28 Omniglot
    images (28 -> 14 -> 7 -> 3 -> 1), 5x5 for 84x84 ones. With ``n_way`` a dense head gives
    logits (MAML); ``n_way=None`` returns the embedding (ProtoNet).

    Weights, in order: for each block ``kernel1 (3,3,C_in,W), scale1 (W,), offset1 (W,),
    kernel2 (3,3,W,W), scale2, offset2, kernel3 (3,3,W,W), scale3, offset3, shortcut_kernel
    (1,1,C_in,W), shortcut_scale, shortcut_offset``; then, with a head, ``w (D, n_way), b (n_way,)``.
    No convolution biases (batch norm's offsets make them redundant). Any weight may carry a
    leading task axis, and ``bn_rows`` normalises with each task's first ``bn_rows`` images only,
    both as in ``conv4``.

    Example: ``init, apply = resnet12(None, widths=(32, 80, 160, 320))`` is a narrower embedding;
    ``apply(init(0), images)`` with ``images [n, 28, 28, 1]`` gives ``[n, 320]``.
    """
    widths = tuple(widths)
    if len(widths) != 4 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1
                               for w in widths):
        raise ValueError(f"widths must be four positive ints (one per block), got {widths}")
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise ValueError(f"in_shape must be (height, width, channels), got {in_shape}")
    if n_way is not None and n_way < 1:
        raise ValueError(f"n_way must be positive or None, got {n_way}")
    h, w = in_shape[0] // 16, in_shape[1] // 16          # four floored halvings
    if h < 1 or w < 1:
        raise ValueError(f"in_shape {tuple(in_shape)} is too small for resnet12's four 2x2 "
                         "poolings (at least 16x16)")
    embedding_size = h * w * widths[-1]

    def init(seed, dtype=tf.float32):
        _check_seed(seed)
        weights, c_in, index = [], in_shape[2], 0
        for width in widths:
            c = c_in
            for _ in range(3):
                weights += [_glorot(seed, index, [3, 3, c, width], 9 * c, 9 * width, dtype),
                            tf.ones([width], dtype), tf.zeros([width], dtype)]
                c, index = width, index + 1
            weights += [_glorot(seed, index, [1, 1, c_in, width], c_in, width, dtype),
                        tf.ones([width], dtype), tf.zeros([width], dtype)]
            c_in, index = width, index + 1
        if n_way is not None:
            weights += [_glorot(seed, index, [embedding_size, n_way], embedding_size, n_way,
                                dtype), tf.zeros([n_way], dtype)]
        return weights

    def apply(weights, x, bn_rows=None):
        x, single = _image_tasks(x, weights[0].dtype, in_shape, bn_rows, "resnet12")
        for b in range(len(widths)):
            k1, s1, o1, k2, s2, o2, k3, s3, o3, kc, sc, oc = weights[12 * b:12 * b + 12]
            y = tf.nn.leaky_relu(_conv_batch_norm(x, k1, s1, o1, 1, bn_rows), LEAKY_SLOPE)
            y = tf.nn.leaky_relu(_conv_batch_norm(y, k2, s2, o2, 1, bn_rows), LEAKY_SLOPE)
            shortcut = _batch_norm_from_rows(_conv1x1(x, kc), sc, oc, bn_rows)
            # Pooling before the leaky ReLU, as conv4 does: both are monotone, so they commute.
            y = _max_pool(_conv_batch_norm(y, k3, s3, o3, 1, bn_rows) + shortcut)
            x = tf.nn.leaky_relu(y, LEAKY_SLOPE)
        return _flat_output(x, weights, embedding_size, n_way, single)

    init.embedding_size = embedding_size
    return init, apply
