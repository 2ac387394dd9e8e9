"""How every benchmark times a step (TensorFlow, XLA through JAX, PyTorch alike): the first call
on its own, warm-up calls, then timed calls each forced to the host with ``float(loss)``.

Free of TensorFlow (the profiler is imported only when asked for), so that the PyTorch reference
and the XLA replay time their steps the same way on a machine without it.
"""

import time

import numpy as np
from absl import logging

from benchmarks import report


def stats(values):
    """Median, min, max and interquartile range of ``values`` (seconds)."""
    values = np.asarray(values, np.float64)
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "min": float(values.min()), "max": float(values.max()),
            "iqr": float(q3 - q1)}


def timed_call(step, state, next_batch):
    """One call of ``step`` on ``next_batch()``, forced to the host with ``float(loss)``:
    ``(state, loss, input wait in s, whole call in s)``."""
    start = time.perf_counter()
    batch = next_batch()
    got = time.perf_counter()
    state, metrics = step(state, batch)
    loss = float(metrics["loss"])
    return state, loss, got - start, time.perf_counter() - start


def time_steps(step, state, next_batch, steps, warmup, profile_dir=None):
    """Run ``step`` ``warmup + steps`` times, each forced to the host with ``float(loss)``.

    Returns a dict: ``first_call_s`` (the first call: trace + compile + run), ``warmup_s`` (the
    other warm-up calls), ``step_s`` (stats of the timed steps, input wait included) and
    ``input_wait_s`` (stats of the time spent in ``next_batch()``), ``stalled_steps`` (steps whose
    wait exceeded ``report.STALL_FRACTION`` of the step), ``loss``. With ``profile_dir``, three
    more steps run under the TensorFlow profiler.
    """
    def one(state):
        return timed_call(step, state, next_batch)

    logging.info("first call: trace + compile + run")
    state, loss, _, first = one(state)
    logging.info("first call took %.2f s; %d more warm-up call(s)", first, warmup - 1)
    start = time.perf_counter()
    for _ in range(warmup - 1):
        state, loss, _, _ = one(state)
    warm = time.perf_counter() - start
    waits, times = [], []
    report_every = max(1, steps // 5)
    for i in range(steps):
        state, loss, wait, took = one(state)
        waits.append(wait)
        times.append(took)
        if (i + 1) % report_every == 0 or i + 1 == steps:
            logging.info("timed step %d/%d: %.2f ms (loss %.4f)", i + 1, steps, took * 1e3, loss)
    if profile_dir:
        logging.info("profiling 3 more steps into %s", profile_dir)
        import tensorflow as tf
        tf.profiler.experimental.start(profile_dir)
        for _ in range(3):
            state, _, _, _ = one(state)
        tf.profiler.experimental.stop()
    stalled = sum(w > report.STALL_FRACTION * t for w, t in zip(waits, times))
    return {"first_call_s": first, "warmup_s": warm, "step_s": stats(times),
            "input_wait_s": stats(waits), "stalled_steps": int(stalled), "loss": loss}
