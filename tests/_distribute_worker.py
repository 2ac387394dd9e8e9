"""Distributed training runs for ``tests/test_distribute.py``, each in a fresh process.

Logical devices and the multi-worker collective runtime can only be configured before TensorFlow
initialises, so the test runs this script instead of touching its own process:

    python tests/_distribute_worker.py mirrored OUT.npz
    TF_CONFIG=... python tests/_distribute_worker.py multiworker OUT.npz CHECKPOINT_DIR

The script trains and writes what it got to ``OUT.npz``; the test computes the single-device
reference itself (``reference`` below, imported by path) and compares.
"""

import os
import sys

import numpy as np

WAY, SHOT, QUERY, META_BATCH, STEPS = 3, 1, 2, 4, 3
MAML = dict(inner_steps=1, outer_lr=1e-2)           # second order: first_order defaults to False
PROTONET = dict(n_way=WAY, lr=1e-2)
LINEAR = dict(inner_steps=2, outer_lr=1e-2, loss="mse")   # the XLA check: cheap to compile


def sampler():
    from functional_meta import data, episodes
    classes = data.synthetic(num_classes=8, per_class=SHOT + QUERY + 1, shape=(8, 8, 1), seed=1)
    return episodes.EpisodeSampler(classes, WAY, SHOT, QUERY, meta_batch=META_BATCH, seed=3)


def batches():
    return [sampler().batch(i) for i in range(STEPS)]


def linear_batches():
    from functional_meta import episodes
    return [episodes.sinusoid_batch(META_BATCH, 5, 5, seed=0, index=i) for i in range(STEPS)]


def problems():
    """name -> (algorithm, step options, (init, apply), initial state, batches)."""
    from functional_meta import maml, nets, protonet
    maml_net = nets.conv4(WAY, channels=4, in_shape=(8, 8, 1), blocks=2)
    proto_net = nets.conv4(None, channels=4, in_shape=(8, 8, 1), blocks=2)
    linear_net = nets.mlp([1, 1])
    return {
        "maml": ("maml", MAML, maml_net, maml.init_state(maml_net[0](0)), batches()),
        "protonet": ("protonet", PROTONET, proto_net, protonet.init_state(proto_net[0](0)),
                     batches()),
        "linear": ("maml", LINEAR, linear_net,
                   maml.init_state(linear_net[0](0), inner_lr=0.01, lr_mode="metasgd"),
                   linear_batches()),
    }


def flat(state):
    import tensorflow as tf
    return [np.asarray(v) for v in tf.nest.flatten(state)]


def train(step, state, steps):
    for tasks in steps:
        state, _ = step(state, tasks)
    return state


def save(directory, state, next_batch):
    np.savez(os.path.join(directory, "state.npz"), *flat(state), next_batch=next_batch)


def restore(directory, template):
    import tensorflow as tf
    with np.load(os.path.join(directory, "state.npz")) as f:
        values = [tf.constant(f[f"arr_{i}"]) for i in range(len(tf.nest.flatten(template)))]
        return tf.nest.pack_sequence_as(template, values), int(f["next_batch"])


def mirrored(out):
    import tempfile

    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from functional_meta import distribute

    strategy = distribute.make_strategy("mirrored")
    results = {"num_replicas": strategy.num_replicas_in_sync}
    for name, (algorithm, options, (_, apply), state, steps) in problems().items():
        initial = state
        step = distribute.make_distributed_train_step(
            strategy, algorithm, apply, meta_batch=META_BATCH, jit_compile=name == "linear",
            **options)
        if name == "maml":
            loss, grads = step.gradients(state, steps[0])
            results["maml_loss"] = np.asarray(loss)
            results.update({f"maml_grad_{i}": np.asarray(g) for i, g in enumerate(grads)})
        for tasks in steps:
            replicas = step.replicas(state, tasks)
            state = replicas[0][0]
        for r, (replica_state, _) in enumerate(replicas):
            results.update({f"{name}_replica{r}_{i}": v for i, v in enumerate(flat(replica_state))})
        if name == "maml":      # resume: two steps, checkpoint, restore, the third step
            with tempfile.TemporaryDirectory() as directory:
                with distribute.checkpoint_directory(strategy, directory) as where:
                    save(where, train(step, initial, steps[:2]), next_batch=2)
                restored, k = restore(directory, initial)
            resumed = train(step, restored, steps[k:])
            results.update({f"maml_resumed_{i}": v for i, v in enumerate(flat(resumed))})
    try:
        distribute.make_distributed_train_step(strategy, "maml", apply, meta_batch=3, **MAML)
        results["odd_error"] = "no error"
    except ValueError as error:
        results["odd_error"] = str(error)
    np.savez(out, **results)


def multiworker(out, checkpoint_dir):
    from functional_meta import distribute
    strategy = distribute.make_strategy("multiworker")     # before any other TensorFlow op

    import tensorflow as tf
    from functional_meta import episodes
    _, _, (_, apply), initial, _ = problems()["maml"]
    step = distribute.make_distributed_train_step(strategy, "maml", apply, meta_batch=META_BATCH,
                                                  jit_compile=False, **MAML)
    # The chief feeds only its own tasks, the other worker the whole global meta-batch: the step
    # takes either, and each replica trains on its slice.
    shard = distribute.shard_sampler(sampler(), strategy)
    source = shard if distribute.is_chief(strategy) else sampler()
    final = train(step, initial, episodes.dataset(source, num_batches=STEPS))

    # Resume: two steps, the chief writes a checkpoint, every worker restores it, one more step.
    state = train(step, initial, episodes.dataset(source, num_batches=2))
    with distribute.checkpoint_directory(strategy, checkpoint_dir) as where:
        save(where, state, next_batch=2)
    wrote_elsewhere = where != checkpoint_dir and not os.path.exists(where)

    @tf.function
    def barrier():      # the others wait here until the chief has written
        return strategy.run(lambda: tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, tf.constant(1.0)))

    barrier()
    restored, k = restore(checkpoint_dir, initial)
    resumed = train(step, restored, episodes.dataset(source, start_batch=k, num_batches=STEPS - k))
    results = {"num_replicas": strategy.num_replicas_in_sync,
               "is_chief": distribute.is_chief(strategy), "shard_size": shard.meta_batch,
               "temporary_dir_removed": wrote_elsewhere}
    results.update({f"final_{i}": v for i, v in enumerate(flat(final))})
    results.update({f"resumed_{i}": v for i, v in enumerate(flat(resumed))})
    np.savez(out, **results)


if __name__ == "__main__":
    if sys.argv[1] == "mirrored":
        mirrored(sys.argv[2])
    else:
        multiworker(sys.argv[2], sys.argv[3])
