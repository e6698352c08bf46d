"""Model merging in weight space: one model from several fine-tuned ones, with no training.

- :func:`uniform_soup`: the mean of the ingredients' weights (Wortsman et al. 2022, "Model soups").
- :func:`greedy_soup`: ingredients ordered by their own score, best first; each joins the soup (the uniform mean of
  those kept) only when the soup's score does not drop (the paper's greedy recipe).
- :func:`task_arithmetic`: ``base + scale * sum_i tau_i`` with task vectors ``tau_i = theta_i - base`` (Ilharco et
  al. 2023, "Editing models with task arithmetic").
- :func:`ties_merge`: TIES-merging (Yadav et al. 2023): each task vector is trimmed to its ``density`` share of
  largest magnitudes, a sign is elected per entry (the sign of the sum of the trimmed values), and the trimmed values
  that agree with it are averaged, zeros left out (the disjoint mean); then ``base + scale * merged``.

Everything works on state dicts of :class:`~mtvision.models.MultiTaskModel` (``backbone.*``, ``heads.<task>.*``,
``momentum_backbones.<task>.*``); scoring a merge on validation data is ``tools/merge_models.py``'s business.

What is merged how:

- The backbone (and any other key outside ``heads.`` / ``momentum_backbones.``) must have the same keys, shapes and
  dtypes in every model: anything else is a ``ValueError`` naming the keys.
- Heads are carried per task: a head that one model holds is taken as it is; held by several, it is merged by the
  backbone's rule over those that hold it. In task arithmetic and TIES a head the base holds is merged from the
  base as the backbone is; one the base lacks is averaged over the tuned models that hold it (one: taken as it is),
  and a head the base alone holds is left out (the merged model has the tuned models' tasks). The same head in
  several models must have the same keys and shapes.
- Momentum backbones (MoCo v3) are training state, an average of past backbones: the merged model's are copies of
  its merged backbone, one per task that had one, which is what loading a model without them does
  (:func:`mtvision.zoo.convert.load_state`) and keeps the merged weights a whole model that loads strictly.
- Floating-point tensors (parameters and buffers alike: BatchNorm's running statistics are averaged) are combined in
  float64 and cast back to the dtype of the first model that holds them (the base in task arithmetic and TIES), so a
  soup of identical models and a scale of 0 give the model back exactly.
- Integer and boolean tensors (``num_batches_tracked``, index tables) are counters and indices, not weights: they are
  never averaged but taken from the first model that holds them (the base in task arithmetic and TIES).

Memory: task arithmetic and TIES hold every task vector at once, in float64 (8 bytes a weight per tuned model), as
TIES trims each task vector as a whole.
"""
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from mtvision.zoo.convert import shorten_keys

__all__ = ['GreedySoup', 'TaskVectorGeometry', 'check_mergeable', 'greedy_soup', 'task_arithmetic',
           'task_vector_geometry', 'task_vectors', 'ties_merge', 'uniform_soup']

State = dict[str, Tensor]
HEADS, MOMENTUM = 'heads.', 'momentum_backbones.'


def _is_shared(key: str) -> bool:
    return not key.startswith((HEADS, MOMENTUM))


def _is_float(tensor: Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


def check_mergeable(states: Sequence[State], names: Sequence[str] | None = None) -> None:
    """Refuse models that cannot be merged key by key, naming the keys: the backbone (every key outside ``heads.``
    and ``momentum_backbones.``) must have the same keys in every model, and a key held by several models the same
    shape and kind (floating point or not)."""
    names = list(names) if names is not None else [f'model {i}' for i in range(len(states))]
    if not states:
        raise ValueError('nothing to merge: no models given')
    first = {key for key in states[0] if _is_shared(key)}
    problems = []
    for name, state in zip(names[1:], states[1:]):
        own = {key for key in state if _is_shared(key)}
        if own != first:
            missing, extra = sorted(first - own), sorted(own - first)
            problems += [f'{name} lacks backbone keys of {names[0]}: {shorten_keys(missing)}'] if missing else []
            problems += [f'{name} has backbone keys {names[0]} lacks: {shorten_keys(extra)}'] if extra else []
    seen: dict[str, tuple[str, Tensor]] = {}
    differing = []
    for name, state in zip(names, states):
        for key, value in state.items():
            if key.startswith(MOMENTUM):
                continue
            if key not in seen:
                seen[key] = (name, value)
                continue
            other_name, other = seen[key]
            if other.shape != value.shape or _is_float(other) != _is_float(value):
                differing.append(f'{key} ({other_name} {tuple(other.shape)} {other.dtype}, {name} '
                                 f'{tuple(value.shape)} {value.dtype})')
    if differing:
        problems.append(f'shapes or kinds differ: {shorten_keys(differing)}')
    if problems:
        raise ValueError('the models cannot be merged:\n  ' + '\n  '.join(problems))


def _mean(values: Sequence[Tensor]) -> Tensor:
    if not _is_float(values[0]):
        return values[0]
    total = sum(value.double() for value in values)
    return (total / len(values)).to(values[0].dtype)


def _momentum_copies(merged: State, states: Sequence[State]) -> State:
    """The merged backbone again as the momentum backbone of every task of ``merged`` that had one."""
    tasks = {key.split('.')[1] for state in states for key in state if key.startswith(MOMENTUM)}
    tasks &= {key.split('.')[1] for key in merged if key.startswith(HEADS)}
    backbone = {key[len('backbone.'):]: value for key, value in merged.items() if key.startswith('backbone.')}
    return {f'{MOMENTUM}{task}.{key}': value.clone() for task in sorted(tasks) for key, value in backbone.items()}


def uniform_soup(states: Sequence[State], names: Sequence[str] | None = None) -> State:
    """The mean of ``states`` (see the module docstring for heads, momentum backbones and integer tensors)."""
    check_mergeable(states, names)
    merged = {}
    for key in dict.fromkeys(key for state in states for key in state if not key.startswith(MOMENTUM)):
        merged[key] = _mean([state[key] for state in states if key in state])
    return {**merged, **_momentum_copies(merged, states)}


def task_vectors(base: State, tuned: Sequence[State]) -> list[State]:
    """``theta_i - base`` for each tuned state, over the floating-point keys the base holds (a head the base lacks
    has no task vector), in float64 so that ``base + tau_i`` gives ``theta_i`` back."""
    return [{key: value.double() - base[key].double() for key, value in state.items()
             if key in base and _is_float(value) and not key.startswith(MOMENTUM)} for state in tuned]


def _merge_from_base(base: State, tuned: Sequence[State], names, combine: Callable[[list[State]], State],
                     scale: float) -> State:
    """``base + scale * combine(task vectors)`` on the keys the base holds, what the base lacks averaged over the
    tuned models (module docstring)."""
    names = list(names) if names is not None else ['base'] + [f'model {i}' for i in range(len(tuned))]
    if not tuned:
        raise ValueError('nothing to merge: no tuned models given')
    check_mergeable([base, *tuned], names)
    keys = dict.fromkeys(key for state in tuned for key in state if not key.startswith(MOMENTUM))
    combined = combine(task_vectors(base, tuned))
    merged = {}
    for key in keys:
        if key not in base:
            merged[key] = _mean([state[key] for state in tuned if key in state])
        elif key in combined:
            merged[key] = (base[key].double() + scale * combined[key]).to(base[key].dtype)
        else:  # integer tensors: the base's
            merged[key] = base[key]
    return {**merged, **_momentum_copies(merged, tuned)}


def task_arithmetic(base: State, tuned_list: Sequence[State], scale: float, names: Sequence[str] | None = None
                    ) -> State:
    """``base + scale * sum_i (theta_i - base)`` (Ilharco et al. 2023), where each key's sum runs over the tuned
    models that hold it. ``names`` (the base's first) name the models in errors."""
    def summed(vectors: list[State]) -> State:
        keys = dict.fromkeys(key for vector in vectors for key in vector)
        return {key: sum(vector[key] for vector in vectors if key in vector) for key in keys}
    return _merge_from_base(base, tuned_list, names, summed, scale)


def _trim(vector: State, density: float) -> State:
    """``vector`` with all but its ``density`` share of largest magnitudes set to 0, the share counted over all its
    tensors together, as TIES' reference code trims a flattened task vector: the ``k = max(1, round(density * n))``
    largest are kept, and any entry as large as the k-th."""
    if density >= 1 or not vector:
        return vector
    magnitudes = torch.cat([value.abs().reshape(-1) for value in vector.values()])
    k = max(1, round(density * magnitudes.numel()))
    threshold = magnitudes.kthvalue(magnitudes.numel() - k + 1).values  # the k-th largest
    return {key: torch.where(value.abs() >= threshold, value, 0) for key, value in vector.items()}


def ties_merge(base: State, tuned_list: Sequence[State], density: float = 0.2, scale: float = 1.0,
               names: Sequence[str] | None = None) -> State:
    """TIES-merging (Yadav et al. 2023): trim each task vector to its ``density`` share of largest magnitudes
    (counted over the whole task vector, every key the base holds), elect each entry's sign as the sign of the sum of
    the trimmed values, average the trimmed values of that sign (zeros left out; an entry whose sum is exactly 0 has
    no elected sign and merges to 0, as the paper defines it, where the reference code falls back to the majority
    sign), then ``base + scale * merged``. ``names`` (the base's first) name the models in errors."""
    if not 0 < density <= 1:
        raise ValueError(f'density is the share of each task vector kept, in (0, 1], got {density}')

    def disjoint_mean(vectors: list[State]) -> State:
        trimmed = [_trim(vector, density) for vector in vectors]
        merged = {}
        for key in dict.fromkeys(key for vector in trimmed for key in vector):
            values = torch.stack([vector[key] for vector in trimmed if key in vector])
            elected = torch.sign(values.sum(dim=0))
            agrees = (torch.sign(values) == elected) & (values != 0)
            count = agrees.sum(dim=0)
            merged[key] = torch.where(agrees, values, 0).sum(dim=0) / count.clamp(min=1)
        return merged
    return _merge_from_base(base, tuned_list, names, disjoint_mean, scale)


class TaskVectorGeometry(NamedTuple):
    """How the task vectors of :func:`task_vector_geometry` lie: each one's norm relative to the base's, and for each
    pair their cosine and the share of entries (non-zero in both) whose signs agree."""
    relative_norms: list[float]
    cosines: list[list[float]]
    sign_agreement: list[list[float]]


def task_vector_geometry(base: State, tuned: Sequence[State]) -> TaskVectorGeometry:
    """The task vectors' sizes and angles over the shared weights (the backbone: heads differ per task), each
    flattened into one float64 vector. Merging works best with small vectors; nearly orthogonal ones, summed,
    act as noise on each other and, averaged, keep ``1 / len(tuned)`` of each task's change."""
    keys = sorted(key for key in base if _is_shared(key) and _is_float(base[key]))
    flat = [torch.cat([vector[key].flatten() for key in keys]) for vector in task_vectors(base, tuned)]
    base_norm = torch.cat([base[key].double().flatten() for key in keys]).norm()
    cosines = [[float(a @ b / (a.norm() * b.norm())) for b in flat] for a in flat]
    agreement = []
    for a in flat:
        row = []
        for b in flat:
            both = (a != 0) & (b != 0)
            row.append(float((a.sign() == b.sign())[both].double().mean()) if both.any() else math.nan)
        agreement.append(row)
    return TaskVectorGeometry([float(vector.norm() / base_norm) for vector in flat], cosines, agreement)


class GreedySoup(NamedTuple):
    """What :func:`greedy_soup` chose: the soup's state, the indices of the ingredients in it (in the order they
    joined), each ingredient's own score, and each candidate after the first as ``(index, score of the soup with it,
    kept)``."""
    state: State
    kept: list[int]
    ingredient_scores: list[float]
    trials: list[tuple[int, float, bool]]

    @property
    def score(self) -> float:
        """The soup's score: its best ingredient's, or the last kept candidate's."""
        accepted = [score for _, score, kept in self.trials if kept]
        return accepted[-1] if accepted else self.ingredient_scores[self.kept[0]]


def greedy_soup(states: Sequence[State], score_fn: Callable[[State], float], names: Sequence[str] | None = None,
                ingredient_scores: Sequence[float] | None = None) -> GreedySoup:
    """The greedy soup of Wortsman et al. 2022: ingredients ordered by their own score (``score_fn``, higher is
    better; ``ingredient_scores`` when already known), best first; each next one joins when the uniform soup of
    those kept and it scores at least the soup without it. So the soup never scores below its best ingredient.

    The ingredients are fine-tunes of the same tasks (the paper's: of one model with different hyperparameters):
    models with different keys (other heads) are refused, as a soup that left one out would lose its head. A NaN
    score counts as the worst."""
    check_mergeable(states, names)
    names = list(names) if names is not None else [f'model {i}' for i in range(len(states))]
    heads = [sorted(key for key in state if not _is_shared(key)) for state in states]
    differ = [name for name, own in zip(names, heads) if own != heads[0]]
    if differ:
        raise ValueError(f'a greedy soup needs models of the same tasks; {differ} hold other heads than '
                         f'{names[0]}: merge models of different tasks with a uniform soup, task arithmetic or TIES')

    def score(state: State) -> float:
        value = float(score_fn(state))
        return -math.inf if math.isnan(value) else value
    scores = [float(s) for s in ingredient_scores] if ingredient_scores is not None else [score(s) for s in states]
    if len(scores) != len(states):
        raise ValueError(f'{len(scores)} ingredient scores for {len(states)} models')
    order = sorted(range(len(states)), key=lambda i: -scores[i])  # stable: ties keep the given order
    kept, best, trials = [order[0]], scores[order[0]], []
    soup = uniform_soup([states[order[0]]])  # its momentum backbones as a soup's: copies of its backbone
    for index in order[1:]:
        candidate = uniform_soup([states[i] for i in kept + [index]])
        candidate_score = score(candidate)
        accepted = candidate_score >= best
        trials.append((index, candidate_score, accepted))
        if accepted:
            kept.append(index)
            soup, best = candidate, candidate_score
    return GreedySoup(soup, kept, scores, trials)
