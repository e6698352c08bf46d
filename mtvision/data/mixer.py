"""Which tasks train at each step.

The mixer is a component with its own state, saved in checkpoints, so a resumed run continues the identical
sequence of task draws.
"""
from collections.abc import Sequence

STRATEGIES = ('all',)


class TaskMixer:
    """Chooses the tasks of each training step.

    Strategies: ``'all'`` draws one batch of every task each step (the default, and the only one for now).

    Args:
        tasks: task names in config order.
        strategy: one of ``STRATEGIES``.
        seed: seed of the draws for strategies that sample.
    """

    def __init__(self, tasks: Sequence[str], strategy: str = 'all', seed: int = 0):
        if strategy not in STRATEGIES:
            raise ValueError(f'mixer.strategy={strategy!r} is not one of {STRATEGIES}')
        if not tasks:
            raise ValueError('the mixer needs at least one task')
        self.tasks = list(tasks)
        self.strategy = strategy
        self.seed = seed
        self.step = 0
        self.draw_counts = {name: 0 for name in self.tasks}

    def next_tasks(self) -> list[str]:
        chosen = list(self.tasks)
        for name in chosen:
            self.draw_counts[name] += 1
        self.step += 1
        return chosen

    def state_dict(self) -> dict:
        return dict(step=self.step, draw_counts=dict(self.draw_counts), strategy=self.strategy, seed=self.seed)

    def load_state_dict(self, state: dict) -> None:
        if state['strategy'] != self.strategy or set(state['draw_counts']) != set(self.tasks):
            raise ValueError(f'mixer state for strategy {state["strategy"]!r} and tasks {sorted(state["draw_counts"])} '
                             f'does not match this run ({self.strategy!r}, {sorted(self.tasks)})')
        self.step = state['step']
        self.draw_counts = dict(state['draw_counts'])
