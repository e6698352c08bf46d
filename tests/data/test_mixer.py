import math
from pathlib import Path
from collections import Counter

import pytest

from mtvision.data.mixer import TaskMixer

SIZES = {'cls': 8000, 'det': 1000, 'seg': 500, 'depth': 125}
TASKS = list(SIZES)
STEPS = 20000


def frequencies(mixer, steps=STEPS):
    counts = Counter(name for _ in range(steps) for name in mixer.next_tasks())
    return {name: counts[name] / steps for name in TASKS}


def assert_close_to(observed, expected, steps=STEPS):
    for name, p in expected.items():
        # five standard deviations of a binomial frequency: fails by chance about once in 3 million
        assert abs(observed[name] - p) <= 5 * math.sqrt(p * (1 - p) / steps) + 1e-12, (name, observed, expected)


@pytest.mark.parametrize('strategy, temperature, expected', [
    ('proportional', 1.0, {name: n / 9625 for name, n in SIZES.items()}),
    ('temperature', 2.0, {name: math.sqrt(n) / sum(math.sqrt(m) for m in SIZES.values()) for name, n in SIZES.items()}),
    ('uniform', 1.0, {name: 0.25 for name in SIZES}),
])
def test_sampled_frequencies_match_the_configured_probabilities(strategy, temperature, expected):
    mixer = TaskMixer(TASKS, strategy=strategy, seed=3, sizes=SIZES, temperature=temperature)
    assert mixer.probabilities() == pytest.approx(expected)
    assert_close_to(frequencies(mixer), expected)
    assert sum(mixer.draw_counts.values()) == STEPS


def test_several_tasks_per_step_are_distinct():
    mixer = TaskMixer(TASKS, strategy='uniform', tasks_per_step=2, seed=0)
    draws = [mixer.next_tasks() for _ in range(2000)]
    assert all(len(step) == 2 == len(set(step)) for step in draws)
    assert_close_to({n: c / 2000 for n, c in mixer.draw_counts.items()}, {n: 0.5 for n in TASKS}, steps=2000)


def test_all_and_round_robin_are_exact():
    assert [TaskMixer(TASKS).next_tasks() for _ in range(2)] == [TASKS, TASKS]
    mixer = TaskMixer(TASKS, strategy='round_robin', tasks_per_step=3)
    assert [mixer.next_tasks() for _ in range(3)] == [['cls', 'det', 'seg'], ['cls', 'det', 'depth'],
                                                       ['cls', 'seg', 'depth']]  # positions 6, 7, 8 = 2, 3, 0


def test_staged_schedule_switches_at_the_boundary():
    mixer = TaskMixer(TASKS, seed=1, sizes=SIZES, stages=[dict(end=100, strategy='all', tasks=['cls']),
                                                          dict(strategy='temperature', temperature=1e9)])
    first = [mixer.next_tasks() for _ in range(100)]
    assert first == [['cls']] * 100
    assert_close_to(frequencies(mixer), {name: 0.25 for name in TASKS})


def test_resumed_mixer_continues_the_identical_sequence():
    reference = TaskMixer(TASKS, strategy='temperature', seed=7, sizes=SIZES, temperature=3.0)
    sequence = [reference.next_tasks() for _ in range(300)]
    interrupted = TaskMixer(TASKS, strategy='temperature', seed=7, sizes=SIZES, temperature=3.0)
    for _ in range(120):
        interrupted.next_tasks()
    resumed = TaskMixer(TASKS, strategy='temperature', seed=7, sizes=SIZES, temperature=3.0)
    resumed.load_state_dict(interrupted.state_dict())
    assert [resumed.next_tasks() for _ in range(180)] == sequence[120:]
    assert resumed.draw_counts == reference.draw_counts
    other_seed = TaskMixer(TASKS, strategy='temperature', seed=8, sizes=SIZES, temperature=3.0)
    with pytest.raises(ValueError, match='does not match'):
        other_seed.load_state_dict(interrupted.state_dict())


@pytest.mark.parametrize('kwargs, message', [
    (dict(strategy='bogus'), "strategy='bogus'"),
    (dict(strategy='proportional'), 'needs the dataset size'),
    (dict(strategy='uniform', tasks_per_step=5), 'tasks_per_step=5'),
    (dict(stages=[dict(end=10, tasks=['nope'])]), r'mixer.stages\[0\].tasks'),
    (dict(stages=[dict(end=10, strategy='all', stratgy='x')]), 'stratgy'),
])
def test_bad_settings_name_the_key(kwargs, message):
    with pytest.raises((ValueError, KeyError), match=message):
        TaskMixer(TASKS, **kwargs)


def test_real_recipes_temperature_sampling_gives_the_epochs_their_headers_state():
    from mtvision.config import load_config

    root = 'configs/real/supervised-4task_vit-b-p16_8xb64-100k_in1k-coco-ade20k-nyuv2.py'
    cfg = load_config(str(Path(__file__).resolve().parents[2] / root))
    # train split sizes: ImageNet-1k, COCO train2017 (every image), ADEChallengeData2016 training, NYUv2's 795
    sizes = {'cls': 1281167, 'det': 118287, 'seg': 20210, 'depth': 795}
    mixer = TaskMixer(list(cfg.tasks), sizes=sizes, **cfg.mixer)
    p = mixer.probabilities()
    weights = {name: math.sqrt(n) for name, n in sizes.items()}
    assert p == pytest.approx({name: w / sum(weights.values()) for name, w in weights.items()})
    epochs = {name: int(cfg.train_cfg.max_iters * p[name] * 8 * cfg.tasks[name].batch_size / sizes[name])
              for name in sizes}
    assert epochs == {'cls': 27, 'det': 45, 'seg': 109, 'depth': 551}  # whole epochs on 8 GPUs, as the header says
    assert all(len(mixer.next_tasks()) == 1 for _ in range(100))
