"""Which tasks train at each step.

Strategies (``strategy=``):

- ``'all'``: every task every step (the default).
- ``'proportional'``: ``tasks_per_step`` tasks drawn with probability proportional to their dataset sizes.
- ``'temperature'``: probability proportional to ``n ** (1 / temperature)`` (T = 1 is proportional, large T
  approaches uniform; the sampling of multilingual and multi-task NLP, e.g. mT5 and "Order Matters in the
  Presence of Dataset Imbalance").
- ``'uniform'``: every task equally likely.
- ``'round_robin'``: ``tasks_per_step`` tasks at a time, cycling through the tasks in config order.

``stages`` chains strategies over training: a list of dicts, each with ``end`` (the step it ends at, exclusive;
the last stage may omit it) and its own ``strategy``, ``tasks`` (a subset, default all), ``tasks_per_step`` and
``temperature``. "High-resource tasks first, then the mixture" is
``stages=[dict(end=1000, strategy='all', tasks=['cls']), dict(strategy='temperature', temperature=2.0)]``.

The draws of step ``s`` are a pure function of ``(seed, s)``: a resumed run continues the identical sequence
from its step alone, and every rank of a distributed run draws the same tasks (so each rank's model runs the same
heads in a step). ``draw_counts`` says how often each task was drawn; the trainer logs it.
"""
from collections.abc import Mapping, Sequence

import torch

STRATEGIES = ('all', 'proportional', 'temperature', 'uniform', 'round_robin')
STAGE_KEYS = {'end', 'strategy', 'tasks', 'tasks_per_step', 'temperature'}


class TaskMixer:
    """Chooses the tasks of each training step.

    Args:
        tasks: task names in config order.
        strategy: one of ``STRATEGIES`` (ignored when ``stages`` is given).
        seed: seed of the draws.
        sizes: ``{task: number of training samples}``, for the size-based strategies.
        tasks_per_step: how many tasks a sampling or round-robin step trains.
        temperature: of the ``'temperature'`` strategy.
        stages: a staged schedule (see the module docstring).
    """

    def __init__(self, tasks: Sequence[str], strategy: str = 'all', seed: int = 0,
                 sizes: Mapping[str, int] | None = None, tasks_per_step: int = 1, temperature: float = 1.0,
                 stages: Sequence[Mapping] | None = None):
        if not tasks:
            raise ValueError('the mixer needs at least one task')
        self.tasks = list(tasks)
        self.seed = seed
        self.sizes = dict(sizes or {})
        default = dict(strategy=strategy, tasks=self.tasks, tasks_per_step=tasks_per_step, temperature=temperature)
        self.stages = [self._check_stage({**default, **stage}, i) for i, stage in enumerate(stages or [{}])]
        self.strategy = 'staged' if stages else strategy
        self.step = 0
        self.draw_counts = {name: 0 for name in self.tasks}

    def _check_stage(self, stage: dict, index: int) -> dict:
        where = f'mixer.stages[{index}]' if index or 'end' in stage else 'mixer'
        unknown = set(stage) - STAGE_KEYS
        if unknown:
            raise KeyError(f'{where} has unknown keys {sorted(unknown)}; known: {sorted(STAGE_KEYS)}')
        if stage['strategy'] not in STRATEGIES:
            raise ValueError(f'{where}.strategy={stage["strategy"]!r} is not one of {STRATEGIES}')
        missing = [name for name in stage['tasks'] if name not in self.tasks]
        if missing or not stage['tasks']:
            raise ValueError(f'{where}.tasks {list(stage["tasks"])} must be a non-empty subset of {self.tasks}')
        if not 1 <= stage['tasks_per_step'] <= len(stage['tasks']):
            raise ValueError(f'{where}.tasks_per_step={stage["tasks_per_step"]} must be in [1, {len(stage["tasks"])}]')
        if stage['temperature'] <= 0:
            raise ValueError(f'{where}.temperature must be positive, got {stage["temperature"]}')
        if stage['strategy'] in ('proportional', 'temperature'):
            absent = [name for name in stage['tasks'] if self.sizes.get(name, 0) <= 0]
            if absent:
                raise ValueError(f'{where}.strategy={stage["strategy"]!r} needs the dataset size of {absent}')
        return dict(stage, tasks=list(stage['tasks']))

    def stage_at(self, step: int) -> dict:
        for stage in self.stages:
            if 'end' not in stage or step < stage['end']:
                return stage
        return self.stages[-1]

    def probabilities(self, step: int = 0) -> dict[str, float]:
        """Chance that a task is the first one drawn at ``step`` (1 for every task of an ``'all'`` stage)."""
        stage = self.stage_at(step)
        kind, names = stage['strategy'], stage['tasks']
        if kind == 'all':
            return {name: 1.0 for name in names}
        if kind in ('uniform', 'round_robin'):
            weights = [1.0] * len(names)
        else:
            power = 1.0 if kind == 'proportional' else 1.0 / stage['temperature']
            weights = [self.sizes[name] ** power for name in names]
        total = sum(weights)
        return {name: weight / total for name, weight in zip(names, weights)}

    def tasks_at(self, step: int) -> list[str]:
        """The tasks of ``step``, in config order; a pure function of the seed and the step."""
        stage = self.stage_at(step)
        names, count = stage['tasks'], stage['tasks_per_step']
        if stage['strategy'] == 'all':
            return list(names)
        if stage['strategy'] == 'round_robin':
            start = step * count
            chosen = {names[(start + i) % len(names)] for i in range(count)}
        else:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            weights = torch.tensor(list(self.probabilities(step).values()), dtype=torch.float64)
            chosen = {names[i] for i in torch.multinomial(weights, count, replacement=False, generator=generator)}
        return [name for name in self.tasks if name in chosen]

    def next_tasks(self) -> list[str]:
        chosen = self.tasks_at(self.step)
        for name in chosen:
            self.draw_counts[name] += 1
        self.step += 1
        return chosen

    def state_dict(self) -> dict:
        return dict(step=self.step, draw_counts=dict(self.draw_counts), strategy=self.strategy, seed=self.seed)

    def load_state_dict(self, state: dict) -> None:
        saved = (state['strategy'], state['seed'], sorted(state['draw_counts']))
        if saved != (self.strategy, self.seed, sorted(self.tasks)):
            raise ValueError(f'mixer state (strategy, seed, tasks) = {saved} does not match this run '
                             f'{(self.strategy, self.seed, sorted(self.tasks))}: the task sequence would change')
        self.step = state['step']
        self.draw_counts = dict(state['draw_counts'])
