"""Data-parallel meta-training over the meta-batch with ``tf.distribute``.

The meta-batch is split over replicas: each replica computes the exact meta-gradient of its share of
the tasks, the gradients are summed over all replicas (every share's loss is scaled by
``local_tasks / meta_batch``, so the sum is the mean over the whole meta-batch, the single-device
meta-gradient), and every replica applies the same Adam update to its own copy of the state. The
replicas' states therefore stay identical without ever being broadcast.

Typical use (a binary with ``--strategy=none|mirrored|multiworker``)::

    strategy = distribute.make_strategy(FLAGS.strategy)     # first TF call of the program
    step = distribute.make_distributed_train_step(
        strategy, "maml", apply, meta_batch=32, inner_steps=1, outer_lr=1e-3)
    sampler = distribute.shard_sampler(sampler, strategy)   # this worker's tasks only
    for tasks in episodes.dataset(sampler, start_batch=k):
        state, metrics = step(state, tasks)                 # plain tensors in and out

Sharding: batch ``i`` of a sampler is a pure function of ``(seed, i)``, so every worker knows the
same global meta-batch without communicating; replica ``r`` (of ``R``) takes tasks
``[r * meta_batch / R, (r + 1) * meta_batch / R)``. No two replicas ever train on the same task and
the union is exactly the single-device meta-batch.

XLA: each replica's meta-gradient and its Adam update are two ``jit_compile`` functions; the
all-reduce between them runs outside XLA. Collective ops inside an XLA cluster fail on CPU devices
("Trying to access resource ... located in device CPU:1 from device CPU:0") and depend on the
cross-device implementation elsewhere, while the all-reduce of a few weight-sized tensors costs
nothing worth fusing. With one replica the step is the same computation as the single-device
``maml.make_train_step`` / ``protonet.make_train_step``, split in two compiled pieces.

Checkpoints: every worker holds the full state, so any worker can write it, but only the chief's
copy may land in the checkpoint directory. ``checkpoint_directory`` gives each worker its place to
write (the real directory on the chief, a temporary one elsewhere, deleted afterwards, as the
TensorFlow multi-worker guide recommends); every worker restores from the chief's directory.
"""

import contextlib
import inspect
import json
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf

from functional_meta import choices, maml, protonet

STRATEGIES = choices.STRATEGIES
ALGORITHMS = ("maml", "protonet")
_PARTS = {"maml": maml.train_step_parts, "protonet": protonet.train_step_parts}


def make_strategy(name, devices=None, logical_cpus=0):
    """The ``tf.distribute.Strategy`` called ``name``, one of ``STRATEGIES``.

    ``logical_cpus > 1`` first splits a GPU-less machine's CPU into that many logical devices (one
    replica each under ``'mirrored'``); it must come before TensorFlow initialises its devices.

    - ``'none'``: TensorFlow's default strategy (one replica on the default device).
    - ``'mirrored'``: ``MirroredStrategy`` over ``devices`` (default: every GPU, or, without GPUs,
      every logical CPU device, so a CPU split into logical devices gets one replica per device).
    - ``'multiworker'``: ``MultiWorkerMirroredStrategy`` configured by the ``TF_CONFIG`` environment
      variable (``{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker",
      "index": i}}``). Create it before any other TensorFlow operation runs: the collective runtime
      can only be configured at program start-up.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    if devices is not None and name != "mirrored":
        raise ValueError(f"devices only applies to strategy='mirrored', got strategy={name!r}")
    if logical_cpus > 1 and not tf.config.list_physical_devices("GPU"):
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0],
            [tf.config.LogicalDeviceConfiguration()] * logical_cpus)
    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if devices is None:
            devices = [d.name for d in tf.config.list_logical_devices("GPU")]
            devices = devices or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(list(devices))
    _check_tf_config(os.environ.get("TF_CONFIG"))
    return tf.distribute.MultiWorkerMirroredStrategy()


def _check_tf_config(text):
    if not text:
        raise ValueError("strategy='multiworker' needs the TF_CONFIG environment variable, e.g. "
                         '{"cluster": {"worker": ["host1:port", "host2:port"]}, '
                         '"task": {"type": "worker", "index": 0}}')
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}): {text!r}") from None
    if not isinstance(config, dict) or "cluster" not in config or "task" not in config:
        raise ValueError(f"TF_CONFIG needs a 'cluster' and a 'task' entry, got {text!r}")


def replica_layout(strategy):
    """``(num_replicas, local_replica_ids)``: the replicas in sync over all workers, and the ids
    (``0..num_replicas-1``) of this worker's replicas, in the order of its local results."""
    ids = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(ctx.replica_id_in_sync_group))
    local = [int(i) for i in strategy.experimental_local_results(ids)]
    if local != list(range(local[0], local[0] + len(local))):
        raise RuntimeError(f"this worker's replica ids {local} are not consecutive; the task "
                           f"slicing assumes they are")
    return strategy.num_replicas_in_sync, local


def check_meta_batch(meta_batch, num_replicas):
    """Tasks per replica; ``ValueError`` unless ``meta_batch`` splits evenly over the replicas."""
    if isinstance(meta_batch, bool) or not isinstance(meta_batch, (int, np.integer)) \
            or meta_batch < 1:
        raise ValueError(f"meta_batch must be a positive integer, got {meta_batch!r}")
    if meta_batch % num_replicas:
        raise ValueError(f"meta_batch={meta_batch} does not split evenly over {num_replicas} "
                         f"replicas: choose a meta_batch that is a multiple of {num_replicas} "
                         f"(e.g. {num_replicas * max(1, round(meta_batch / num_replicas))})")
    return int(meta_batch) // num_replicas


def worker_tasks(strategy, meta_batch):
    """The ``slice`` of the global meta-batch that this worker's replicas train on (all of it
    unless the strategy spans several workers)."""
    num_replicas, local = replica_layout(strategy)
    per_replica = check_meta_batch(meta_batch, num_replicas)
    return slice(min(local) * per_replica, (max(local) + 1) * per_replica)


class ShardedSampler:
    """One worker's share of an ``EpisodeSampler``'s meta-batches (see ``shard_sampler``).

    Offers the sampler interface that ``episodes.dataset`` uses (``batch``, ``sample``,
    ``get_state``, ``set_state``, ``signature``); ``meta_batch`` is this worker's share.
    """

    def __init__(self, sampler, tasks):
        self.sampler, self.tasks = sampler, tasks
        self.meta_batch = tasks.stop - tasks.start

    def batch(self, index):
        # The whole batch is drawn (its episodes come from one generator in sequence) and cut.
        return tuple(np.asarray(a)[self.tasks] for a in self.sampler.batch(index))

    def sample(self):
        return tuple(np.asarray(a)[self.tasks] for a in self.sampler.sample())

    def get_state(self):
        return self.sampler.get_state()

    def set_state(self, state):
        self.sampler.set_state(state)

    def signature(self):
        return tuple(tf.TensorSpec((self.meta_batch,) + tuple(s.shape[1:]), s.dtype)
                     for s in self.sampler.signature())


def shard_sampler(sampler, strategy):
    """A view of ``sampler`` whose batch ``i`` holds only this worker's tasks of global batch ``i``.

    With one worker (``'none'``, ``'mirrored'``) that is the whole batch. The state (seed, next
    batch index) is the sampler's own, so checkpoints and resumption are unchanged.
    """
    return ShardedSampler(sampler, worker_tasks(strategy, sampler.meta_batch))


def _check_options(algorithm, options):
    """Unknown options name the allowed ones; the step parts check the values themselves."""
    parameters = inspect.signature(_PARTS[algorithm]).parameters
    allowed = [name for name in parameters if name != "apply_fn"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for algorithm={algorithm!r}; "
                         f"the options are {allowed}")


def _check_task_chunk(tasks, options):
    chunk = options.get("task_chunk")
    if isinstance(chunk, int) and chunk > 0 and tasks % chunk:
        raise ValueError(f"task_chunk={chunk} must divide the meta-batch ({tasks} tasks per "
                         "replica)")


def make_train_step(strategy, algorithm, apply_fn, *, meta_batch, jit_compile=True, **options):
    """The training step of ``algorithm`` on ``meta_batch`` tasks per step: the single-device step
    (``maml.make_train_step`` or ``protonet.make_train_step``) for ``strategy=None``, otherwise
    ``make_distributed_train_step``. Either way the options and the meta-batch are checked here,
    before anything compiles."""
    if strategy is not None:
        return make_distributed_train_step(strategy, algorithm, apply_fn, meta_batch=meta_batch,
                                           jit_compile=jit_compile, **options)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    _check_options(algorithm, options)
    _check_task_chunk(meta_batch, options)
    single = maml.make_train_step if algorithm == "maml" else protonet.make_train_step
    return single(apply_fn, jit_compile=jit_compile, **options)


def make_distributed_train_step(strategy, algorithm, apply_fn, *, meta_batch, jit_compile=True,
                                **options):
    """``step(state, tasks) -> (state, metrics)``: training on ``meta_batch`` tasks per step, split
    over the replicas of ``strategy``.

    ``algorithm`` is ``'maml'`` (``options``: those of ``maml.make_train_step``: ``inner_steps``,
    ``outer_lr``, ``first_order``, ``loss``, ``step_weights``, ``clip_norm``, ``recompute``) or
    ``'protonet'`` (``n_way``, ``lr``, ``metric``, as ``protonet.make_train_step``). ``state``
    comes from the algorithm's ``init_state`` and the step keeps its contract: plain tensors in,
    plain tensors out (this worker's first replica's copy; all copies are identical), metrics are
    means over the whole meta-batch, and the result equals the single-device step on the same
    meta-batch up to float rounding.

    ``tasks`` is ``(support_x, support_y, query_x, query_y)`` with a leading task axis holding
    either the global meta-batch (``meta_batch`` tasks, identical on every worker) or this worker's
    share of it (``shard_sampler``). ``ValueError`` here, before anything compiles, if
    ``meta_batch`` does not split evenly over the replicas.

    Also ``step.gradients(state, tasks) -> (loss, grads)``: the all-reduced meta-gradient, and
    ``step.replicas(state, tasks)``: one ``(state, metrics)`` per local replica.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    num_replicas, local_ids = replica_layout(strategy)
    per_replica = check_meta_batch(meta_batch, num_replicas)
    worker_share = per_replica * len(local_ids)
    _check_options(algorithm, options)
    _check_task_chunk(per_replica, options)
    _, local_gradient, update = _PARTS[algorithm](apply_fn, **options)
    scale = per_replica / meta_batch

    @tf.function(jit_compile=jit_compile, autograph=False)
    def local_gradients(state, tasks):
        grads, metrics = local_gradient(state, tasks)
        return ([g * scale for g in grads], {name: v * scale for name, v in metrics.items()})

    compiled_update = tf.function(update, jit_compile=jit_compile, autograph=False)

    def replica_gradients(state, tasks):
        grads, metrics = local_gradients(state, tasks)
        context = tf.distribute.get_replica_context()
        return context.all_reduce(tf.distribute.ReduceOp.SUM, (grads, metrics))

    def replica_step(state, tasks):
        grads, metrics = replica_gradients(state, tasks)
        return compiled_update(state, grads), metrics

    def local_results(values):
        return [tf.nest.map_structure(lambda v, i=i: strategy.experimental_local_results(v)[i],
                                      values) for i in range(len(local_ids))]

    @tf.function(autograph=False)
    def run_steps(state, tasks):
        return local_results(strategy.run(replica_step, args=(state, tasks)))

    @tf.function(autograph=False)
    def run_gradients(state, tasks):
        return local_results(strategy.run(replica_gradients, args=(state, tasks)))

    checked = []

    def distribute(state, tasks):
        if not isinstance(tasks, (tuple, list)) or len(tasks) != 4:
            raise ValueError("tasks must be a tuple (support_x, support_y, query_x, query_y)")
        size = tasks[0].shape[0]
        if size == meta_batch:
            offset = 0                      # the global batch: replica r takes share r
        elif size == worker_share:
            offset = min(local_ids)         # this worker's share: local replicas in order
        else:
            raise ValueError(f"tasks hold {size} tasks; expected the global meta_batch="
                             f"{meta_batch} or this worker's share of {worker_share} "
                             f"({len(local_ids)} of {num_replicas} replicas)")
        if algorithm == "protonet" and not checked:
            protonet.validate_episode(np.asarray(tasks[1]), np.asarray(tasks[3]), options["n_way"])
            checked.append(True)
        dtype = tf.nest.flatten(state["weights"])[0].dtype
        tasks = [tf.convert_to_tensor(a) for a in tasks]
        if algorithm == "protonet":
            tasks = [tf.cast(tasks[0], dtype), tf.cast(tasks[1], tf.int32),
                     tf.cast(tasks[2], dtype), tf.cast(tasks[3], tf.int32)]

        def share(context):
            start = (context.replica_id_in_sync_group - offset) * per_replica
            return tuple(tf.identity(a[start:start + per_replica]) for a in tasks)

        return strategy.experimental_distribute_values_from_function(share)

    def step(state, tasks):
        return run_steps(state, distribute(state, tasks))[0]

    def gradients(state, tasks):
        grads, metrics = run_gradients(state, distribute(state, tasks))[0]
        return metrics["loss"], grads

    def replicas(state, tasks):
        return run_steps(state, distribute(state, tasks))

    step.gradients = gradients
    step.replicas = replicas
    step.num_replicas = num_replicas
    step.tracing_count = run_steps.experimental_get_tracing_count
    return step


def is_chief(strategy):
    """Whether this worker writes checkpoints and summaries (always, with a single worker)."""
    return bool(strategy.extended.should_checkpoint)


@contextlib.contextmanager
def checkpoint_directory(strategy, directory):
    """Yields the directory this worker should write its checkpoint of ``directory`` to.

    The chief gets ``directory`` itself. Every other worker gets a fresh temporary directory that
    is deleted when the block ends, so all workers can run the same saving code (which a strategy
    may need, e.g. for variables whose saving involves collectives) while only the chief's files
    remain. Restore on every worker from ``directory``::

        with distribute.checkpoint_directory(strategy, FLAGS.checkpoint_dir) as where:
            save(where, state)
    """
    if is_chief(strategy):
        os.makedirs(directory, exist_ok=True)
        yield directory
        return
    resolver = strategy.cluster_resolver
    temporary = tempfile.mkdtemp(prefix=f"functional_meta_{resolver.task_type}{resolver.task_id}_")
    try:
        yield temporary
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
