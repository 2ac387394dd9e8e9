"""Training loop and binaries: real-data learning, exact resume, crash safety, non-finite stops,
evaluation statistics, and flag errors before any work."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from absl import app, flags

from _binaries import json_lines, run_binary
from benchmarks import evaluate as eval_bin
from benchmarks import train as train_bin
from functional_meta import (checkpoints, configs, data, episodes, metrics, plots, presets,
                             training)

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'omniglot'
SMALL1 = ['Balinese', 'Early_Aramaic', 'Greek', 'Korean', 'Latin']
NEW_IN_SMALL2 = ['Japanese_(katakana)', 'Sanskrit', 'Tagalog']


# ---------------------------------------------------------------------------------------------
# Statistics and baselines


def test_confidence_interval_on_known_values():
    # [1..5]: mean 3, sample std sqrt(2.5), half-width 1.96 * sqrt(2.5) / sqrt(5) = 1.96 / sqrt(2).
    mean, ci = metrics.mean_confidence_interval([1, 2, 3, 4, 5])
    assert mean == pytest.approx(3.0) and ci == pytest.approx(1.96 / math.sqrt(2))
    # 50 zeros and 50 ones: std (ddof 1) = sqrt(25 / 99), half-width 1.96 * that / 10.
    out = training.summarize({'accuracy': [0.0, 1.0] * 50})
    assert out['accuracy'] == pytest.approx(0.5)
    assert out['accuracy_ci95'] == pytest.approx(1.96 * math.sqrt(25 / 99) / 10)
    assert metrics.mean_confidence_interval([0.7]) == (0.7, 0.0)


def test_pixel_baselines_nearest_image_versus_class_mean():
    # Pixels (one each): class 0 at 0 and 10, class 1 at 6; the query 9 is nearest to the image 10
    # (class 0) but to the class-1 mean 6 (the class-0 mean is 5).
    support_x = np.array([0.0, 10.0, 6.0]).reshape(1, 3, 1, 1, 1)
    support_y = np.array([[0, 0, 1]])
    query_x = np.array([9.0, 1.0]).reshape(1, 2, 1, 1, 1)
    query_y = np.array([[0, 0]])
    batch = (support_x, support_y, query_x, query_y)
    np.testing.assert_array_equal(training.pixel_baseline(batch, 'nn'), [1.0])
    np.testing.assert_array_equal(training.pixel_baseline(batch, 'class_mean'), [0.5])


def test_meta_splits_are_disjoint_and_test_classes_unrotated():
    images = [np.full((4, 2, 2, 1), i, np.uint8) for i in range(12)]
    names = [f'{g}/c{i}' for i, g in enumerate('aaabbbcccddd')]
    suffixes = ['', '/rot90', '/rot180', '/rot270']          # as data.load(rotations=True) names
    rotated = data.ClassData([x for x in images for _ in suffixes],
                             [n + s for n in names for s in suffixes],
                             [n[0] for n in names for _ in suffixes])
    train, val, test = training.meta_splits(rotated, train_groups=['a', 'b', 'c'],
                                            test_groups=['d'], val_fraction=0.34, seed=1)
    base = lambda split: {n.split('/rot')[0] for n in split.names}
    assert not base(train) & base(val) and not base(train) & base(test)
    assert set(test.groups) == {'d'} and len(test) == 3          # no rotated copies
    assert len(val) == 3 and not any('/rot' in n for n in val.names)
    assert len(train) == 4 * 6                                   # 6 classes with 3 rotations each
    with pytest.raises(ValueError, match='train_groups and test_groups share'):
        training.meta_splits(rotated, train_groups=['a', 'b'], test_groups=['b'])
    with pytest.raises(ValueError, match='test_groups'):
        training.meta_splits(rotated, test_groups=['nope'])


def test_pca_projection():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 2)) * [5.0, 0.5] @ np.array([[0.6, 0.8], [-0.8, 0.6]])
    x = np.hstack([x, 1e-3 * rng.normal(size=(50, 3))]) + 7.0
    xy = plots.pca_2d(x)
    assert xy.shape == (50, 2)
    np.testing.assert_allclose(xy.mean(0), 0, atol=1e-9)
    # The projection keeps the pairwise distances of the (nearly planar) data.
    d = lambda a: np.linalg.norm(a[:, None] - a[None], axis=-1)
    np.testing.assert_allclose(d(xy), d(x - x.mean(0)), atol=1e-2)
    assert xy[:, 0].var() > 10 * xy[:, 1].var()


# ---------------------------------------------------------------------------------------------
# Figures: what a reader needs to know is on them (labels and legends, not pixels)


@pytest.fixture
def pyplot():
    pytest.importorskip('matplotlib')
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    yield plt
    plt.close('all')


def _legend(ax_or_fig):
    return [t.get_text() for t in ax_or_fig.get_legend().get_texts()] \
        if hasattr(ax_or_fig, 'get_legend') else \
        [t.get_text() for legend in ax_or_fig.legends for t in legend.get_texts()]


def test_learning_curves_say_how_each_accuracy_was_measured(tmp_path, pyplot):
    """20-way training and 5-way validation are labelled as such (from the run's config.json),
    and the validation interval is a band in the legend, spanning the records' ci95."""
    records = [{'step': 10, 'steps': 20, 'loss': 2.0, 'accuracy': 0.3},
               {'split': 'val', 'step': 10, 'accuracy': 0.5, 'accuracy_ci95': 0.05},
               {'step': 20, 'steps': 20, 'loss': 1.0, 'accuracy': 0.6},
               {'split': 'val', 'step': 20, 'accuracy': 0.7, 'accuracy_ci95': 0.04}]
    (tmp_path / training.HISTORY_FILE).write_text(''.join(json.dumps(r) + '\n' for r in records))
    (tmp_path / configs.CONFIG_FILE).write_text(json.dumps(
        {'n_way': 20, 'test_n_way': 5, 'k_shot': 1, 'loss': 'cross_entropy'}))
    fig = plots.learning_curves_figure(tmp_path / training.HISTORY_FILE)
    left, right = fig.axes
    assert _legend(right) == ['training (20-way 1-shot), mean of each 10 steps',
                              'validation (5-way 1-shot)', 'validation 95% interval']
    assert _legend(left) == ['training (20-way 1-shot), mean of each 10 steps']
    assert (left.get_xlabel(), right.get_ylabel()) == ('step', 'query accuracy')
    band = right.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(0.45) and band[:, 1].max() == pytest.approx(0.74)
    # Regression: K and the inner steps of each, the training MSE beside the validation MSE.
    records = [{'step': 5, 'steps': 5, 'loss': 3.0},
               {'split': 'val', 'step': 5, 'mse': 2.0, 'mse_ci95': 0.5}]
    (tmp_path / training.HISTORY_FILE).write_text(''.join(json.dumps(r) + '\n' for r in records))
    fig = plots.learning_curves_figure(tmp_path / training.HISTORY_FILE, config={
        'n_way': 1, 'k_shot': 10, 'loss': 'mse', 'inner_steps': 1, 'test_inner_steps': 10})
    assert _legend(fig.axes[1]) == ['training (K=10, 1 inner step)',
                                    'validation (K=10, 10 inner steps)', 'validation 95% interval']
    fig = plots.learning_curves_figure(tmp_path / training.HISTORY_FILE,
                                       config={'family': 'mann', 'n_way': 5, 'k_shot': 10})
    assert _legend(fig.axes[0]) == ['training (5 classes x 10 instances)']


def test_sinusoid_figure_has_axis_labels_and_a_legend_beside_the_data(pyplot):
    x = np.linspace(-5, 5, 50)
    curves = {'x': x, 'truth': np.sin(x), 'support_x': x[::10], 'support_y': np.sin(x[::10]),
              'pre-update': 0 * x, '1 step': 0.5 * np.sin(x), '10 steps': 0.9 * np.sin(x)}
    fig = plots.sinusoid_figure(curves)
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ('x', 'y')
    assert _legend(ax) == ['ground truth', 'pre-update', 'after 1 step', 'after 10 steps',
                           '5 points used for the gradient']
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert ax.get_legend().get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1


def test_embeddings_figure_has_a_class_legend(pyplot):
    rng = np.random.default_rng(0)
    names = np.array(['Greek/character01'] * 3 + ['Latin/character02'] * 3)
    fig = plots.embeddings_figure([('step 10', rng.normal(size=(6, 4)), names),
                                   ('step 20', rng.normal(size=(6, 4)), names[::-1])])
    assert _legend(fig) == ['Greek/character01', 'Latin/character02']
    colours = [[tuple(c.get_facecolor()[0]) for c in ax.collections] for ax in fig.axes]
    assert colours[0] == colours[1] and colours[0][0] != colours[0][1]    # one colour per class


def test_sweep_figure_names_the_throughput_unit(pyplot):
    """In a process of its own: fm-sweep's required --grid flag would break the other binaries'
    flag parsing in this one."""
    script = """if True:
        from benchmarks import sweep
        rows = [{'error': '', 'mode': mode, 'tasks_per_s': 10.0 + i, 'peak_memory_mib': 100.0,
                 'peak_memory_kind': 'host RSS'} for i, mode in enumerate(['eager', 'function'])]
        grid = [('mode', ['eager', 'function'])]
        print(sweep.figure(rows, grid, 'protonet').axes[0].get_ylabel())
        print(sweep.figure(rows, grid, 'maml').axes[0].get_ylabel())
    """
    done = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.splitlines() == ['episodes / s', 'tasks / s'], done.stderr[-2000:]

# ---------------------------------------------------------------------------------------------
# Real data


@pytest.fixture(scope='module')
def omniglot_paths():
    paths = [OMNIGLOT / 'images_background_small1.zip', OMNIGLOT / 'images_background_small2.zip']
    if not all(p.exists() for p in paths):
        pytest.skip(f"Omniglot small zips not found in {OMNIGLOT}")
    return ','.join(str(p) for p in paths)


@pytest.mark.slow          # real Omniglot: 120 ProtoNet steps, then two evaluations
def test_protonet_learns_held_out_omniglot_alphabets(omniglot_paths, tmp_path, capsys):
    """fm-train then fm-eval in this process: ProtoNet trained on the alphabets of small1 scores
    well above chance (0.2) and above raw-pixel 1-NN on small2's new alphabets, 5-way 1-shot."""
    out = tmp_path / 'protonet'
    data_flags = [f'--data_path={omniglot_paths}', f'--train_groups={",".join(SMALL1)}',
                  f'--test_groups={",".join(NEW_IN_SMALL2)}']
    run_binary(train_bin, ['--algorithm=protonet', '--data=omniglot', *data_flags,
                           '--channels=16', '--n_way=10', '--k_shot=1', '--q_query=5',
                           '--outer_lr=3e-3', '--steps=120', '--log_every=40', '--val_every=120',
                           '--val_episodes=25', '--checkpoint_every=60', f'--out_dir={out}'])
    config = json.loads((out / 'config.json').read_text())
    assert config['algorithm'] == 'protonet' and config['channels'] == 16
    assert config['test_groups'] == NEW_IN_SMALL2
    capsys.readouterr()
    eval_flags = [f'--checkpoint={out}', '--n_way=5', '--k_shot=1', '--num_episodes=100', '--json']
    run_binary(eval_bin, eval_flags)
    run_binary(eval_bin, eval_flags + ['--method=nn'])
    model, nn = json_lines(capsys.readouterr().out)
    assert model['split'] == 'test' and model['num_episodes'] == 100 and model['n_way'] == 5
    assert model['step'] == 120
    assert model['accuracy'] > 0.5, model
    assert model['accuracy'] > nn['accuracy'] + 0.1, (model, nn)
    assert 0 < model['accuracy_ci95'] < 0.05
    train_records, val_records = plots.read_history(out / training.HISTORY_FILE)
    assert [r['step'] for r in train_records] == [40, 80, 120]
    assert [r['step'] for r in val_records] == [120]
    assert sorted(p.name for p in (out / 'train').iterdir())          # TensorBoard events
    pytest.importorskip('matplotlib')
    png = plots.learning_curves(out / training.HISTORY_FILE, tmp_path / 'curves.png')
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


# ---------------------------------------------------------------------------------------------
# Resume, crashes, non-finite losses


@pytest.fixture
def op_determinism():
    """Op determinism for one test. It is process-wide and TF has no public switch back: the
    private one restores it so later tests run as before."""
    from tensorflow.python.framework import config as tf_config
    was_deterministic = tf_config.is_op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    yield
    if not was_deterministic:
        tf_config.disable_op_determinism()


_LEARNERS = {}


def _tiny_maml(tmp_path, **options):
    """A tiny MAML learner and a function making its sampler. Learners are stateless: one per
    ``options`` serves every test, whose steps are then traced once."""
    config = configs.make_config('maml', data='synthetic', channels=4, image_shape=[8, 8, 1],
                                 n_way=3, k_shot=1, q_query=2, meta_batch=2, inner_steps=1,
                                 **options)
    classes = data.synthetic(8, 5, (8, 8, 1), seed=3)
    key = json.dumps(options, sort_keys=True)
    if key not in _LEARNERS:
        _LEARNERS[key] = training.make_learner(config, jit_compile=False)
    learner = _LEARNERS[key]

    def sampler():
        return training.make_sampler(classes, n_way=3, k_shot=1, q_query=2, meta_batch=2, seed=5,
                                     **configs.augment_options(config))
    return learner, sampler


# The second case resumes at step 3 right after the outer rate has halved (updates 3 and 4 use
# half the rate, 5 and 6 a quarter) and with shifted, rotated and scaled training images.
@pytest.mark.slow
@pytest.mark.parametrize('options', [{}, dict(lr_decay_every=2, lr_decay=0.5, augment_shift=1,
                                              augment_rotate=10.0, augment_scale=0.1)])
def test_maml_resume_repeats_the_uninterrupted_losses(tmp_path, options, op_determinism):
    learner, sampler = _tiny_maml(tmp_path, **options)
    common = dict(seed=2, log_every=1, checkpoint_every=3, summaries=False,
                  on_progress=lambda record: None)
    whole = training.train(learner, sampler(), out_dir=tmp_path / 'a', steps=6, **common)
    first = training.train(learner, sampler(), out_dir=tmp_path / 'b', steps=3, **common)
    with pytest.raises(ValueError, match='resume'):
        training.train(learner, sampler(), out_dir=tmp_path / 'b', steps=6, **common)
    second = training.train(learner, sampler(), out_dir=tmp_path / 'b', steps=6, resume=True,
                            **common)
    assert len(whole.losses) == 6 and len(first.losses) == len(second.losses) == 3
    assert len(set(whole.losses)) == 6                       # the losses do change step to step
    assert first.losses + second.losses == whole.losses      # exactly equal
    restored = [checkpoints.Checkpoints(tmp_path / run, learner.init(0)).restore()
                for run in ('a', 'b')]
    assert restored[0][1] == restored[1][1]                  # step, next batch, seeds
    assert restored[1][1]['step'] == 6 and restored[1][1]['next_batch'] == 6
    for x, y in zip(tf.nest.flatten(restored[0][0]), tf.nest.flatten(restored[1][0])):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    steps = [r['step'] for r in plots.read_history(tmp_path / 'b' / training.HISTORY_FILE)[0]]
    assert steps == [1, 2, 3, 4, 5, 6]


def _scalar_events(folder):
    """``{(tag, step): [values]}`` of the scalar summaries in a TensorBoard folder's events files."""
    values = {}
    for path in sorted(Path(folder).glob('events.out.tfevents.*')):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == 'scalars':
                    values.setdefault((value.tag, event.step), []).append(
                        float(tf.make_ndarray(value.tensor)))
    return values


def _logged(folder):
    """A run folder's history records without the timing fields, and its TensorBoard scalars."""
    records = [{k: v for k, v in r.items() if k not in ('episodes_per_sec', 'eta_sec')}
               for r in map(json.loads, (folder / training.HISTORY_FILE).read_text().splitlines())]
    events = {name: _scalar_events(folder / name) for name in ('train', 'val')}
    return records, {name: {k: v for k, v in e.items() if 'per_sec' not in k[0]}
                     for name, e in events.items()}


class _Killed(Exception):
    pass


@pytest.mark.slow          # 5-15 s: three runs with validation
def test_resume_off_the_log_boundary_logs_what_an_uninterrupted_run_logs(tmp_path, op_determinism):
    """A run checkpointed at step 7 (progress lines every 5 steps) dies after writing step 10's
    line and step 8's validation; resumed, its history.jsonl and TensorBoard scalars equal an
    uninterrupted run's: step 10's mean covers steps 6-10 (two of them before the checkpoint),
    and the dead attempt's values after step 7 are gone, not doubled."""
    learner, sampler = _tiny_maml(tmp_path)
    evaluator = training.make_evaluator(learner.config, learner.apply, jit_compile=False)
    val_sampler = training.make_sampler(data.synthetic(8, 5, (8, 8, 1), seed=4), n_way=3,
                                        k_shot=1, q_query=2, meta_batch=2, seed=9)
    common = dict(seed=2, steps=12, log_every=5, checkpoint_every=7, val_every=4,
                  validate=lambda state: training.evaluate(evaluator, state, val_sampler, 2))

    def killed_at_10(record):
        if record['step'] == 10 and 'split' not in record:
            raise _Killed

    whole = training.train(learner, sampler(), out_dir=tmp_path / 'whole',
                           on_progress=lambda r: None, **common)
    with pytest.raises(_Killed):
        training.train(learner, sampler(), out_dir=tmp_path / 'resumed', on_progress=killed_at_10,
                       **common)
    run = tmp_path / 'resumed'
    assert [r['step'] for r in plots.read_history(run / training.HISTORY_FILE)[0]] == [5, 10]
    assert tf.train.latest_checkpoint(str(run / 'checkpoints')).endswith('ckpt-7')
    (run / 'checkpoints' / 'ckpt-12_temp').mkdir()        # as a save killed mid-way leaves it
    events_file = next((run / 'train').glob('events.out.tfevents.*'))
    first_record_start = events_file.read_bytes()[:20]     # a 12-byte header and 8 of its data
    with events_file.open('ab') as f:                      # as a record torn by the kill
        f.write(first_record_start)
    (run / 'checkpoints' / 'ckpt-12_temp' / 'part-00000-of-00001.index').write_bytes(b'partial')
    resumed = training.train(learner, sampler(), out_dir=run, resume=True,
                             on_progress=lambda r: None, **common)
    assert not (run / 'checkpoints' / 'ckpt-12_temp').exists()
    assert resumed.step == 12 and len(resumed.losses) == 5 and resumed.best == whole.best

    records, events = _logged(tmp_path / 'whole')
    assert [(r.get('split', 'train'), r['step']) for r in records] == [
        ('val', 4), ('train', 5), ('val', 8), ('train', 10), ('train', 12), ('val', 12)]
    assert sorted(events['train']) == [(tag, step) for tag in ('accuracy', 'loss')
                                       for step in (5, 10, 12)]
    assert ('accuracy_ci95', 8) in events['val']
    assert _logged(run) == (records, events)            # one value per tag and step, the same
    np.testing.assert_allclose(records[3]['loss'], np.mean(whole.losses[5:10]), rtol=1e-12)


def test_resume_without_a_checkpoint_or_after_the_end(tmp_path):
    """Resuming a folder without checkpoints is an error naming it; resuming a finished run
    returns its best validation (from its history), without training."""
    learner, sampler = _tiny_maml(tmp_path)
    common = dict(log_every=2, checkpoint_every=2, summaries=False, on_progress=lambda r: None)
    with pytest.raises(ValueError, match=f'cannot resume: {tmp_path / "run"} holds no checkpoint'
                                         '.*leave out resume'):
        training.train(learner, sampler(), out_dir=tmp_path / 'run', steps=2, resume=True,
                       **common)
    validate = lambda state: {'accuracy': 0.5, 'accuracy_ci95': 0.1}
    done = training.train(learner, sampler(), out_dir=tmp_path / 'run', steps=2, val_every=1,
                          validate=validate, **common)
    again = training.train(learner, sampler(), out_dir=tmp_path / 'run', steps=2, resume=True,
                           **common)
    assert done.best == again.best == {'step': 1, 'accuracy': 0.5, 'accuracy_ci95': 0.1}
    assert again.losses == [] and again.checkpoint.endswith('ckpt-2')
    with pytest.raises(app.UsageError, match='--resume: --out_dir=.* holds no checkpoint'):
        run_binary(train_bin, ['--algorithm=maml', '--data=sinusoid', '--resume',
                               f'--out_dir={tmp_path / "empty"}'])

def test_lr_schedule_reaches_the_compiled_step(tmp_path):
    """With the rate cut a hundredfold after every step, the second update moves the weights
    about a hundred times less than the first (Adam's first steps move each weight by about the
    rate); without the schedule both are alike."""
    def moves(**options):
        learner, sampler = _tiny_maml(tmp_path, **options)
        state = learner.init(0)
        batches = [sampler().batch(i) for i in range(2)]
        sizes = []
        for batch in batches:
            new, _ = learner.step(state, batch)
            sizes.append(max(float(tf.reduce_max(tf.abs(a - b)))
                             for a, b in zip(new['weights'], state['weights'])))
            state = new
        return sizes
    first, second = moves(lr_decay_every=1, lr_decay=0.01)
    assert second < 0.03 * first
    first, second = moves()
    assert second > 0.3 * first


class _NaNAt(episodes.SinusoidSampler):
    """Sinusoid batches whose batch ``bad`` has a NaN target."""

    def __init__(self, bad, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad = bad

    def batch(self, index):
        batch = super().batch(index)
        if index == self.bad:
            batch[1][0, 0, 0] = np.nan
        return batch


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    config = configs.make_config('maml', data='sinusoid', hidden=[8], meta_batch=4)
    learner = training.make_learner(config, jit_compile=False)
    common = dict(log_every=5, checkpoint_every=5, summaries=False, on_progress=lambda r: None)
    training.train(learner, _NaNAt(5, 4, 10, 10), out_dir=tmp_path, steps=5, **common)
    before = _digests(tmp_path / 'checkpoints')
    with pytest.raises(checkpoints.NonFiniteError, match='at step 6') as caught:
        training.train(learner, _NaNAt(5, 4, 10, 10), out_dir=tmp_path, steps=20, resume=True,
                       **common)
    assert caught.value.step == 6 and 'ckpt-5' in str(caught.value)
    assert _digests(tmp_path / 'checkpoints') == before
    state, info, path = checkpoints.Checkpoints(tmp_path, learner.init(0)).restore()
    assert path.endswith('ckpt-5') and info['step'] == 5 and checkpoints.all_finite(state)
    bad = dict(state, weights=[w * np.nan for w in state['weights']])
    with pytest.raises(checkpoints.NonFiniteError, match='not finite'):
        checkpoints.Checkpoints(tmp_path, learner.init(0)).save(bad, dict(info, step=6))
    assert _digests(tmp_path / 'checkpoints') == before


def test_absurd_outer_lr_exits_naming_the_step(tmp_path):
    """fm-train with an outer learning rate of 1e30: step 1 is saved, step 2's loss overflows."""
    with pytest.raises(SystemExit) as caught:
        run_binary(train_bin, ['--algorithm=maml', '--data=sinusoid', '--hidden=8', '--nojit',
                               '--outer_lr=1e30', '--steps=50', '--checkpoint_every=1',
                               '--val_every=0', f'--out_dir={tmp_path}'])
    assert 'step 2' in str(caught.value.code) and 'ckpt-1' in str(caught.value.code)
    assert tf.train.latest_checkpoint(str(tmp_path / 'checkpoints')).endswith('ckpt-1')


def test_divergence_threshold_is_far_above_chance():
    protonet = configs.make_config('protonet', data='synthetic', n_way=20)
    assert training.divergence_threshold(protonet) == pytest.approx(10 * math.log(20) + 10)
    assert training.divergence_threshold(configs.make_config('maml', data='sinusoid')) is None


def test_diverging_protonet_stops_with_the_last_good_checkpoint(tmp_path):
    """ProtoNet at an outer rate of 1e6: the loss jumps from about log(3) to ~1e9 at step 2 and
    stays finite. Three windows above the threshold stop the run at step 6; nothing after step 1
    is saved, as latest or best, though every validation scores higher than the one before."""
    config = configs.make_config('protonet', data='synthetic', channels=4, image_shape=[16, 16, 1],
                                 n_way=3, k_shot=1, q_query=2, meta_batch=2, outer_lr=1e6)
    learner = training.make_learner(config, jit_compile=False)
    sampler = training.make_sampler(data.synthetic(8, 5, (16, 16, 1), seed=3), n_way=3, k_shot=1,
                                    q_query=2, meta_batch=2, seed=5)
    records = []
    validations = iter(range(1, 100))
    with pytest.raises(checkpoints.DivergedError, match='diverged.*ckpt-1') as caught:
        training.train(learner, sampler, out_dir=tmp_path, steps=50, log_every=2,
                       checkpoint_every=1, val_every=1, summaries=False, on_progress=records.append,
                       validate=lambda state: {'accuracy': next(validations) / 100})
    assert caught.value.step == 6
    losses = [r['loss'] for r in records if 'split' not in r]
    assert len(losses) == 3 and min(losses) > 1e6 and all(map(math.isfinite, losses))
    store = checkpoints.Checkpoints(tmp_path, learner.init(0))
    assert [Path(p).name for p in store.candidates()] == ['ckpt-1']
    assert [Path(p).name for p in store.candidates('best')] == ['ckpt-1']


def test_diverging_run_exits_naming_the_last_good_checkpoint(tmp_path):
    """fm-train stops a diverging ProtoNet run with a message, not 'trained'."""
    with pytest.raises(SystemExit) as caught:
        run_binary(train_bin, ['--algorithm=protonet', '--data=synthetic', '--channels=4',
                               '--n_way=3', '--k_shot=1', '--q_query=1', '--meta_batch=1',
                               '--outer_lr=1e6', '--steps=50', '--log_every=1',
                               '--checkpoint_every=1', '--val_every=0', '--nojit',
                               f'--out_dir={tmp_path}'])
    message = str(caught.value.code)
    assert message.startswith('fm-train: stopped: the loss diverged') and 'ckpt-1' in message
    assert tf.train.latest_checkpoint(str(tmp_path / 'checkpoints')).endswith('ckpt-1')

def test_run_without_validation_says_so(tmp_path, capsys):
    run_binary(train_bin, ['--algorithm=maml', '--data=sinusoid', '--hidden=8', '--nojit',
                           '--steps=2', '--val_every=0', f'--out_dir={tmp_path}'])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert 'to step 2' in last and 'best validation: none (no validation ran)' in last, last


def test_resuming_a_finished_run_reports_its_best_validation(tmp_path, capsys):
    argv = ['--algorithm=maml', '--data=sinusoid', '--hidden=8', '--nojit', '--steps=2',
            '--val_every=1', '--val_episodes=2', f'--out_dir={tmp_path}']
    run_binary(train_bin, argv)
    run_binary(train_bin, argv + ['--resume'])
    first, again = (line for line in capsys.readouterr().out.splitlines() if 'to step 2' in line)
    assert first.startswith('trained maml') and again.startswith('already trained maml'), again
    assert first.split('; best validation: ')[1] == again.split('; best validation: ')[1]
    assert "'mse'" in again and 'no validation ran' not in again


def test_checkpoints_written_without_a_log_state_still_restore(tmp_path):
    """A run folder checkpointed before the progress window was kept resumes (an empty
    window)."""
    old = tf.train.Checkpoint(
        state={'weights': [tf.Variable([1.0, 2.0])]}, step=tf.Variable(3, dtype=tf.int64),
        data_seed=tf.Variable(5, dtype=tf.int64), next_batch=tf.Variable(3, dtype=tf.int64),
        best_score=tf.Variable(-np.inf, dtype=tf.float64),
        best_step=tf.Variable(-1, dtype=tf.int64))
    tf.train.CheckpointManager(old, tmp_path / 'checkpoints', 1).save(checkpoint_number=3)
    state, info, path = checkpoints.Checkpoints(tmp_path, {'weights': [tf.zeros(2)]}).restore()
    assert path.endswith('ckpt-3') and info['step'] == 3 and info['log_state'] == ''
    np.testing.assert_array_equal(state['weights'][0].numpy(), [1.0, 2.0])


@pytest.mark.slow          # a training process, killed, then a resume
def test_killed_run_leaves_a_readable_checkpoint(tmp_path):
    """SIGKILL a training process that checkpoints every step, then restore and resume; a damaged
    newest checkpoint or a stray partial one is skipped for the last good one."""
    log = (tmp_path / 'stderr.txt').open('w')
    process = subprocess.Popen(
        [sys.executable, '-m', 'benchmarks.train', '--algorithm=maml', '--data=sinusoid',
         '--hidden=8', '--nojit', '--steps=1000000', '--checkpoint_every=1', '--keep=3',
         '--val_every=0', '--log_every=1000', f'--out_dir={tmp_path}'],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    state_file = tmp_path / 'checkpoints' / 'checkpoint'
    deadline = time.time() + 240
    try:
        while time.time() < deadline and process.poll() is None:
            listed = tf.train.get_checkpoint_state(str(tmp_path / 'checkpoints')) \
                if state_file.exists() else None
            if listed and len(listed.all_model_checkpoint_paths) >= 3:
                break
            time.sleep(0.05)
        time.sleep(0.3)                          # somewhere in the middle of later steps
        assert process.poll() is None, (tmp_path / 'stderr.txt').read_text()[-2000:]
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    config, _ = configs.load_config(tmp_path)
    learner = training.make_learner(config, jit_compile=False)
    store = checkpoints.Checkpoints(tmp_path, learner.init(0))
    state, info, path = store.restore()
    assert path.endswith(f"ckpt-{info['step']}") and info['step'] >= 3
    assert info['next_batch'] == info['step'] and checkpoints.all_finite(state)

    # A partial checkpoint that was never listed, and a listed newest one that is damaged.
    (tmp_path / 'checkpoints' / f"ckpt-{info['step'] + 1}.index").write_bytes(b'partial')
    data_file = Path(f'{path}.data-00000-of-00001')
    data_file.write_bytes(data_file.read_bytes()[:len(data_file.read_bytes()) // 2])
    _, older, older_path = store.restore()
    assert older['step'] < info['step'] and older_path in store.candidates()

    sampler = training.make_sampler(None, n_way=1, k_shot=config['k_shot'],
                                    q_query=config['q_query'], meta_batch=config['meta_batch'],
                                    seed=config['seed'])
    result = training.train(learner, sampler, out_dir=tmp_path, steps=older['step'] + 2,
                            resume=True, summaries=False, on_progress=lambda r: None)
    assert result.step == older['step'] + 2 and len(result.losses) == 2


def test_resume_accepts_another_spelling_of_the_same_data_path(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    arrays = {f'x_{s}': rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
              for s, n in (('train', 60), ('test', 20))}
    arrays.update(y_train=np.arange(60) % 10, y_test=np.arange(20) % 10)
    np.savez(tmp_path / 'mnist.npz', **arrays)
    monkeypatch.chdir(tmp_path)
    flags_ = ['--algorithm=maml', '--data=mnist', '--hidden=8', '--n_way=3', '--k_shot=1',
              '--q_query=1', '--meta_batch=2', '--nojit', '--val_every=0', '--log_every=1',
              '--checkpoint_every=1', f'--out_dir={tmp_path / "run"}']
    run_binary(train_bin, flags_ + ['--data_path=mnist.npz', '--steps=1'])
    config, _ = configs.load_config(tmp_path / 'run')
    assert config['data_path'] == str(tmp_path / 'mnist.npz')      # stored absolute
    run_binary(train_bin, flags_ + [f'--data_path={tmp_path}/./mnist.npz', '--steps=2', '--resume'])
    # A run whose config.json holds a relative path (as fm-train stored it before) resumes too.
    stored = tmp_path / 'run' / configs.CONFIG_FILE
    # It also lacks the fields added since (lr schedule, augmentation): they read as their
    # defaults, so the run resumes; asking for another value is a config change.
    old = json.loads(stored.read_text())
    for name in ('lr_decay_every', 'lr_decay', 'augment_shift', 'augment_rotate', 'augment_scale'):
        del old[name]
    stored.write_text(json.dumps(dict(old, data_path='mnist.npz')))
    run_binary(train_bin, flags_ + [f'--data_path={tmp_path}/mnist.npz', '--steps=3', '--resume'])
    steps = [r['step'] for r in plots.read_history(tmp_path / 'run' / training.HISTORY_FILE)[0]]
    assert steps == [1, 2, 3]
    with pytest.raises(SystemExit, match=r'cannot resume.*lr_decay_every: 0 -> 100'):
        run_binary(train_bin, flags_ + ['--data_path=mnist.npz', '--steps=4', '--resume',
                                        '--lr_decay_every=100'])


def test_augmentation_only_for_the_training_sampler(tmp_path, monkeypatch):
    """fm-train augments the training episodes only (validation uses plain ones), stores the
    settings in config.json, and fm-eval of that run samples plain episodes."""
    calls = []
    make_sampler = training.make_sampler

    def recording(classes, **kwargs):
        calls.append(tuple(kwargs.get(name, 0) for name in configs.AUGMENT_FIELDS))
        return make_sampler(classes, **kwargs)
    monkeypatch.setattr(training, 'make_sampler', recording)
    out = tmp_path / 'run'
    run_binary(train_bin, ['--algorithm=protonet', '--data=synthetic', '--channels=4',
                           '--n_way=3', '--k_shot=1', '--q_query=1', '--augment_shift=2',
                           '--augment_rotate=10', '--augment_scale=0.1', '--steps=2',
                           '--val_every=2', '--val_episodes=2', '--nojit',
                           f'--out_dir={out}'])
    assert calls == [(2, 10.0, 0.1), (0, 0, 0)]             # training, then validation
    config = configs.load_config(out)[0]
    assert [config[name] for name in configs.AUGMENT_FIELDS] == [2, 10, 0.1]
    calls.clear()
    run_binary(eval_bin, [f'--checkpoint={out}', '--num_episodes=2', '--q_query=1', '--nojit'])
    assert calls == [(0, 0, 0)]


# ---------------------------------------------------------------------------------------------
# Flag errors before any work


@pytest.mark.parametrize('argv, names', [
    (['--algorithm=reptile'], '--algorithm'),
    (['--algorithm=protonet', '--data=omniglot', '--data_path=/no/such/folder'], '--data_path'),
    (['--algorithm=maml', '--split=0.9,0.9,0.1'], '--split'),
    (['--algorithm=protonet', '--lr_decay_every=-1'], '--lr_decay_every'),
    (['--algorithm=protonet', '--lr_decay=1.5'], '--lr_decay'),
    (['--algorithm=protonet', '--augment_shift=-2'], '--augment_shift'),
    (['--algorithm=protonet', '--augment_scale=-0.1'], '--augment_scale'),
])
def test_bad_flag_values_fail_at_parsing(argv, names, tmp_path):
    with pytest.raises(flags.Error, match=names):
        run_binary(train_bin, argv + [f'--out_dir={tmp_path}'])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize('argv, names', [
    (['--algorithm=protonet', '--data=synthetic', '--n_way=50'], 'n_way=50.*45 classes'),
    (['--algorithm=protonet', '--data=omniglot'], '--data_path'),
    (['--algorithm=protonet', '--inner_lr=0.1'], 'inner_lr'),
    (['--algorithm=maml', '--preset=protonet_omniglot'], 'preset'),
    (['--algorithm=pretrain', '--data=synthetic'], 'pretrain'),
    (['--algorithm=metasgd', '--lr_mode=lslr'], 'lr_mode'),
    (['--algorithm=maml', '--data=synthetic', '--train_groups=class0001,class0002',
      '--test_groups=class0002'], 'share'),
    (['--algorithm=maml', '--data=synthetic', '--meta_batch=4', '--task_chunk=3'],
     '--task_chunk.*task_chunk=3 .*divide the meta-batch'),
    (['--algorithm=protonet', '--data=synthetic', '--n_way=5', '--task_chunk=2'],
     'task_chunk=2 needs a MAML'),
    (['--algorithm=protonet', '--data=synthetic', '--lr_decay_every=100', '--lr_decay=0'],
     r'lr_decay must be in \(0, 1\]'),
    (['--algorithm=maml', '--data=sinusoid', '--augment_shift=1'],
     "augment_shift=1 augments images; data='sinusoid' has none"),
    (['--algorithm=protonet', '--data=synthetic', '--augment_rotate=180'],
     r'augment_rotate must be a number in \[0, 180\)'),
    (['--algorithm=maml', '--data=sinusoid', '--augment_scale=0.1'],
     "augment_scale=0.1 augments images; data='sinusoid' has none"),
    (['--algorithm=protonet', '--data=synthetic', '--augment_shift=28'],
     r'augment_shift=28 must be smaller than the images \(28x28\)'),
])
def test_bad_flag_combinations_fail_before_training(argv, names, tmp_path):
    with pytest.raises(app.UsageError, match=names):
        run_binary(train_bin, argv + [f'--out_dir={tmp_path}'])
    assert not list(tmp_path.iterdir())


def test_evaluate_flag_errors(tmp_path):
    with pytest.raises(app.UsageError, match='--checkpoint'):
        run_binary(eval_bin, [])
    with pytest.raises(app.UsageError, match='--checkpoint'):
        run_binary(eval_bin, [f'--checkpoint={tmp_path}/missing'])
    with pytest.raises(app.UsageError, match='--data'):
        run_binary(eval_bin, ['--method=nn'])


@pytest.mark.slow          # a process of its own: TensorFlow's start-up
def test_binary_exits_nonzero_naming_the_flag(tmp_path):
    """The same errors from a real process: non-zero status and the flag on stderr."""
    result = subprocess.run(
        [sys.executable, '-m', 'benchmarks.train', '--algorithm=protonet', '--data=synthetic',
         '--n_way=50', f'--out_dir={tmp_path}'],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert 'n_way=50' in result.stderr and 'meta-training split has 45 classes' in result.stderr


@pytest.mark.slow          # two training processes
def test_mirrored_strategy_trains_like_one_device(tmp_path):
    """fm-train --strategy=mirrored over two logical CPUs gives the single-device losses."""
    losses = {}
    for strategy in ("none", "mirrored"):
        out = tmp_path / strategy
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.train", "--algorithm=maml", "--data=synthetic",
             "--channels=4", "--meta_batch=4", "--steps=3", "--log_every=1", "--val_every=0",
             "--jit=false", f"--strategy={strategy}", "--logical_cpus=2", f"--out_dir={out}"],
            capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        replicas = 2 if strategy == "mirrored" else None
        if replicas:
            assert "--strategy=mirrored: 2 replicas" in proc.stderr
        records = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
        losses[strategy] = [r["loss"] for r in records if "loss" in r]
    assert len(losses["none"]) == 3
    np.testing.assert_allclose(losses["mirrored"], losses["none"], rtol=1e-5)


def test_default_task_chunk_keeps_about_80_omniglot_images_per_chunk():
    def chunk(preset, **overrides):
        return training.default_task_chunk(dict(presets.PRESETS[preset], **overrides))

    assert chunk("maml_omniglot_5way") == 8           # config A: 8 tasks of 10 images
    assert chunk("maml_omniglot_20way") == 2          # 2 tasks of 40 images
    assert chunk("maml_omniglot_20way", meta_batch=16) == 2
    assert training.default_task_chunk(dict(presets.PRESETS["maml_omniglot_5way"]), replicas=2) \
        == 8                                          # 16 tasks per replica
    assert chunk("maml_omniglot_5way", meta_batch=6) is None        # 60 images: all at once
    assert chunk("maml_omniglot_5way", meta_batch=25) == 5          # a divisor, never a remainder
    assert chunk("maml_miniimagenet") == 1            # one 84x84x3 task is over the budget
    assert chunk("maml_sinusoid") is None             # an MLP: whole meta-batch


def test_long_evaluation_logs_its_progress(monkeypatch, caplog):
    """An evaluation past EVAL_PROGRESS_SECONDS says how many episodes are scored, not after the
    last batch; a quick one says nothing."""
    sampler = training.make_sampler(data.synthetic(8, 5, (8, 8, 1), seed=4), n_way=3, k_shot=1,
                                    q_query=2, meta_batch=2, seed=5)
    evaluator = training.pixel_evaluator('nn')
    for seconds, expected in ((0.0, ['2/5', '4/5']), (1e9, [])):
        monkeypatch.setattr(training, 'EVAL_PROGRESS_SECONDS', seconds)
        with caplog.at_level('INFO', logger='absl'):     # whatever verbosity a binary left
            caplog.clear()
            values = training.episode_values(evaluator, None, sampler, 5)
        said = [r.getMessage().split()[1] for r in caplog.records
                if r.getMessage().startswith('scored')]
        assert said == expected and len(values['accuracy']) == 5
