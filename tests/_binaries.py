"""The binaries run in the test process: no interpreter or TensorFlow start per run."""

import json

from absl import flags
from absl.testing import flagsaver


def run_binary(module, argv):
    """A binary's main in this process, with its flags parsed from ``argv`` and restored after."""
    with flagsaver.flagsaver():
        flags.FLAGS.unparse_flags()
        flags.FLAGS([module.__name__] + list(argv))
        module.main([module.__name__])


def json_lines(text):
    """The JSON lines (``--json``) of what a binary printed."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]
