"""Benchmark one Prototypical Networks training step: compile time, step time, episodes/s,
FLOP/s, peak memory.

Starts from a preset and overrides any field by flag. Examples:

  fm-protonet-bench                                 # protonet_omniglot, 60-way 5-shot
  fm-protonet-bench --preset=protonet_miniimagenet --n_way=20 --json
  fm-protonet-bench --device=cpu --mode=xla --meta_batch=4 --metric=cosine

See benchmarks/common.py for the method and functional_meta/flops.py for what FLOPs count.
"""

from absl import app, flags

from benchmarks import common
from functional_meta import distribute, flops, presets, protonet

FLAGS = flags.FLAGS
common.define_flags("protonet")
flags.adopt_module_key_flags(common)


def build_step(config, jit_compile, strategy=None):
    """The compiled ProtoNet train step of ``config`` (split over ``strategy``'s replicas when
    given), its state, FLOPs and settings."""
    init, apply = presets.network(config)
    state = protonet.init_state(init(FLAGS.seed))
    options = dict(n_way=config["n_way"], lr=config["outer_lr"], metric=FLAGS.metric)
    step = distribute.make_train_step(strategy, "protonet", apply, meta_batch=config["meta_batch"],
                                      jit_compile=jit_compile, **options)
    return step, state, flops.protonet_step(config), {"metric": FLAGS.metric}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.run_benchmark("protonet", build_step)


def run():
    common.run_binary(main, __name__)


if __name__ == "__main__":
    run()
