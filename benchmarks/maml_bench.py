"""Benchmark one MAML meta-training step: compile time, step time, tasks/s, FLOP/s, peak memory.

Starts from a preset and overrides any field by flag; every MAML variant is a flag (second order
by default, --first_order, --lr_mode=metasgd|lslr, --msl, --recompute). Examples:

  fm-maml-bench                                     # maml_omniglot_5way, synthetic batch
  fm-maml-bench --preset=maml_miniimagenet --inner_steps=2 --first_order --json
  fm-maml-bench --device=cpu --mode=function --steps=50 --profile_dir=/tmp/trace
  fm-maml-bench --data=omniglot --data_path=images_background.zip
  fm-maml-bench --export_hlo=/tmp/config_a --export_target=gpu   # for fm-xla-replay

See benchmarks/runner.py for the method and functional_meta/flops.py for what FLOPs count.
"""

from absl import app, flags

import benchmarks
from benchmarks import flag_groups
from functional_meta import flops, presets     # free of TensorFlow, as this module

FLAGS = flags.FLAGS
flag_groups.define_flags("maml")
flags.adopt_module_key_flags(flag_groups)


def build_step(config, jit_compile, strategy=None):
    """The compiled MAML train step of ``config`` (split over ``strategy``'s replicas when
    given), its state, FLOPs and settings."""
    from functional_meta import distribute, maml
    init, apply = presets.network(config)
    steps = config["inner_steps"]
    state = maml.init_state(init(FLAGS.seed), config["inner_lr"], FLAGS.lr_mode, steps)
    options = flag_groups.maml_options(config, strategy.num_replicas_in_sync if strategy else 1)
    step = distribute.make_train_step(strategy, "maml", apply, meta_batch=config["meta_batch"],
                                      jit_compile=jit_compile, **options)
    step_flops = flops.maml_step(config, first_order=FLAGS.first_order, multi_step_loss=FLAGS.msl)
    algorithm = {"inner_steps": steps, "order": "first" if FLAGS.first_order else "second",
                 "lr_mode": FLAGS.lr_mode, "msl": FLAGS.msl, "recompute": FLAGS.recompute,
                 "task_chunk": options["task_chunk"]}
    return step, state, step_flops, algorithm


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    benchmarks.start_tensorflow()
    from benchmarks import runner
    if FLAGS.export_hlo:
        runner.export_benchmark("maml", build_step)
    else:
        runner.run_benchmark("maml", build_step)


def run():
    flag_groups.run_binary(main, __name__)


if __name__ == "__main__":
    run()
