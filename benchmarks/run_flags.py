"""Flags shared by fm-train and fm-eval: data source, class splits, episode shape, XLA.

In fm-eval a flag left unset takes the checkpoint's value from its config.json.
"""

import os

from absl import flags

from functional_meta import choices, configs

flags.DEFINE_enum("data", None, list(configs.DATA_SOURCES),
                  "Data source; default: the preset's (fm-eval: the checkpoint's). 'sinusoid' is "
                  "the MAML regression task.")
flags.DEFINE_string("data_path", None,
                    "Zip/folder/.npz of the source (several Omniglot zips joined by ','); for the "
                    "TFDS sources an optional data_dir.")
flags.DEFINE_bool("rotations", False, "Add each class rotated by 90/180/270 degrees as new "
                  "classes (training split only; validation and test use the originals).",)
flags.DEFINE_list("train_groups", None, "Groups (Omniglot alphabets) for meta-training; default: "
                  "all not in --val_groups/--test_groups.")
flags.DEFINE_list("val_groups", None, "Groups for validation; default: --val_fraction of the "
                  "training classes.")
flags.DEFINE_list("test_groups", None, "Groups for meta-testing; default: all groups not used for "
                  "training or validation.")
flags.DEFINE_list("exclude_groups", None, "Groups dropped before any split.")
flags.DEFINE_enum("bn", None, list(choices.BN_MODES), "Batch-norm statistics of the queries: "
                  "transductive (ProtoNet's from support and queries together, MAML's from the "
                  "query set) or support (from the support set alone, so each query is scored "
                  "independently). fm-train: ProtoNet only, in training and validation; default "
                  "transductive. fm-eval: default as the checkpoint was trained.")
flags.DEFINE_list("split", ["0.7", "0.1", "0.2"], "Train,val,test fractions of the groups, used "
                  "when neither --train_groups nor --test_groups is given.")
flags.DEFINE_float("val_fraction", 0.1, "With group lists and no --val_groups: the fraction of "
                   "training classes held out for validation (0 = none).")
flags.DEFINE_integer("split_seed", 0, "Seed of the random class splits.", lower_bound=0)
flags.DEFINE_bool("jit", None, "XLA-compile the steps; default: on for MAML-style algorithms, for "
                  "ProtoNet only on GPU (oneDNN convolutions are faster on CPU), for MANN/LSTM "
                  "only on GPU (XLA's loop ran them slower on CPU).")
flags.DEFINE_integer("n_way", None, "Classes per episode; default: the preset's (fm-eval: the "
                     "checkpoint's test way). MANN/LSTM: classes per sequence.", lower_bound=1)
flags.DEFINE_integer("k_shot", None, "Support examples per class; default: the preset's (fm-eval: "
                     "the checkpoint's). MANN/LSTM: instances of each class in a sequence.",
                     lower_bound=1)
flags.DEFINE_integer("q_query", None, "Query examples per class; default: the preset's (fm-eval: "
                     "the checkpoint's for MAML, so batch norm sees query sets of the trained "
                     "size; 15 for ProtoNet and the pixel baselines).", lower_bound=1)

flags.DEFINE_bool("episodes_within_group", False, "Draw every class of an episode from one group "
                  "(Omniglot alphabet), as Lake et al.'s one-shot runs do; groups with fewer than "
                  "--n_way classes are skipped (their count is logged). fm-train: the training "
                  "episodes (validation keeps episodes across groups: its held-out classes are "
                  "few per alphabet). fm-eval: the scored episodes (default: across groups, "
                  "whatever the checkpoint trained with).")

flags.DEFINE_integer("inner_steps", None, "MAML inner steps; default: the preset's (fm-eval: at "
                     "test time, default the checkpoint's test_inner_steps; sinusoids are also "
                     "scored after 1 step).", lower_bound=1)


@flags.validator("data_path", "--data_path: every path (joined by ',') must exist")
def _check_data_path(value):
    return value is None or all(os.path.exists(p) for p in value.split(","))


@flags.validator("split", "--split: three non-negative fractions train,val,test summing to <= 1")
def _check_split(value):
    try:
        fractions = [float(v) for v in value]
    except (TypeError, ValueError):
        return False
    return len(fractions) == 3 and min(fractions) >= 0 and sum(fractions) <= 1 + 1e-9
