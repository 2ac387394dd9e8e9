"""Benchmark one Prototypical Networks training step: compile time, step time, episodes/s,
FLOP/s, peak memory.

Starts from a preset and overrides any field by flag. Examples:

  fm-protonet-bench                                 # protonet_omniglot, 60-way 5-shot
  fm-protonet-bench --preset=protonet_miniimagenet --n_way=20 --json
  fm-protonet-bench --device=cpu --mode=xla --meta_batch=4 --metric=cosine
  fm-protonet-bench --n_way=5 --k_shot=1 --q_query=15 --export_hlo=/tmp/protonet_5way

See benchmarks/runner.py for the method and functional_meta/flops.py for what FLOPs count.
"""

from absl import app, flags

import benchmarks
from benchmarks import flag_groups
from functional_meta import flops, presets     # free of TensorFlow, as this module

FLAGS = flags.FLAGS
flag_groups.define_flags("protonet")
flags.adopt_module_key_flags(flag_groups)


def build_step(config, jit_compile, strategy=None):
    """The compiled ProtoNet train step of ``config`` (split over ``strategy``'s replicas when
    given), its state, FLOPs and settings."""
    from functional_meta import distribute, protonet
    init, apply = presets.network(config)
    state = protonet.init_state(init(FLAGS.seed))
    options = dict(n_way=config["n_way"], lr=config["outer_lr"], metric=FLAGS.metric)
    step = distribute.make_train_step(strategy, "protonet", apply, meta_batch=config["meta_batch"],
                                      jit_compile=jit_compile, **options)
    return step, state, flops.protonet_step(config), {"metric": FLAGS.metric}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    benchmarks.start_tensorflow()
    from benchmarks import runner
    if FLAGS.export_hlo:
        runner.export_benchmark("protonet", build_step)
    else:
        runner.run_benchmark("protonet", build_step)


def run():
    flag_groups.run_binary(main, __name__)


if __name__ == "__main__":
    run()
