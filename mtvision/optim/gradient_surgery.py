"""Gradient surgery as weights from a Gram matrix: PCGrad and Aligned-MTL.

Notation: ``T`` tasks, ``P`` shared parameters, ``G`` [T, P] the per-task gradients of the shared parameters (row
``t`` is the gradient of task ``t``'s loss), ``K = G G^T`` [T, T] their Gram matrix. Both methods depend on ``G``
only through ``K``, so each is written as a map ``K -> w`` to a T-vector of weights, and the update written into
``.grad`` is ``w^T G`` (:func:`combine`), or equivalently the gradient of the weighted loss ``sum_t w_t L_t`` (one
more backward pass on the retained graph). ``K`` may therefore come from anywhere: accumulated bucket by bucket
(:func:`gram_from_gradients`), summed over ranks, or built from feature-level gradients.

Conventions shared by every function here:

* **float64.** ``K`` is converted to float64 and the T x T algebra runs on the CPU in float64 (T is small, and the
  PCGrad loop makes one data-dependent branch per pair, which would be one device sync each on a GPU). Weights are
  returned as float64 on the device of ``gram``. A device ``gram`` is read back once per call; reading it once per
  step (``gram.cpu()``) and passing the host copy to the weighting, :func:`combine` and :func:`gram_diagnostics`
  keeps the whole surgery at one device sync. A float32 ``G G^T`` over millions of parameters can be off by
  1e-3 relative, so build ``K`` with :func:`gram_from_gradients`, which accumulates in float64.
* **Non-finite K** (an fp16 overflow under a grad scaler): nothing raises; the weights are all NaN, so ``w^T G`` is
  non-finite and ``GradScaler.step`` skips the step and backs off. :func:`is_finite_gram` is the explicit check.
* **Absent tasks.** Pass only the rows and columns of the tasks present in the step (and a preference of that
  length). A single task gives ``w = [1]``.
* **Scale.** ``w`` is invariant to a common positive factor on ``K``: a loss scale ``s`` (``G -> s G``) scales the
  update by ``s`` and leaves its direction unchanged, so both methods compose with loss scaling.
"""
import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    'AlignedMTLWeighting',
    'PCGradWeighting',
    'aligned_mtl_weights',
    'combine',
    'gram_diagnostics',
    'gram_from_gradients',
    'is_finite_gram',
    'pcgrad_orders',
    'pcgrad_weights',
]

Reduction = Literal['sum', 'mean']
ScaleMode = Literal['min', 'median', 'rmse']
_REDUCTIONS = ('sum', 'mean')
_SCALE_MODES = ('min', 'median', 'rmse')
_EPS64 = torch.finfo(torch.float64).eps
# columns per float32 product in gram_from_gradients: over 5.5M columns, 2^12 keeps K within 2e-8 of its float64
# value (relative to the largest norm; the float32 rounding of the gradients themselves is 6e-8), and the chunks'
# products run as one batched matrix product, as fast as 2^14 or 2^16 columns
_GRAM_CHUNK = 1 << 12


def _as_gram(gram: Tensor) -> Tensor:
    """``gram`` validated and copied to a float64 CPU tensor."""
    if not isinstance(gram, Tensor):
        raise TypeError(f'gram must be a Tensor [T, T], got {type(gram).__name__}')
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(f'gram must be a non-empty square matrix [T, T], got shape {tuple(gram.shape)}')
    if not gram.is_floating_point():
        raise TypeError(f'gram must be a floating-point tensor, got dtype {gram.dtype}')
    return gram.detach().to(device='cpu', dtype=torch.float64)


def _on_device_of(weights: Tensor, gram: Tensor) -> Tensor:
    """Host ``weights`` on the device of ``gram``: as they are for a host ``gram``, else copied without blocking (a
    blocking copy to a GPU waits for its queue to drain; from pageable memory the copy is staged at once)."""
    return weights if weights.device == gram.device else weights.to(gram.device, non_blocking=True)


def _non_finite_weights(num_tasks: int, device: torch.device) -> Tensor:
    return torch.full((num_tasks,), math.nan, dtype=torch.float64, device=device)


def is_finite_gram(gram: Tensor) -> bool:
    """Whether every entry of ``gram`` is finite (no inf/NaN from an overflowed low-precision backward)."""
    return bool(torch.isfinite(gram).all())


def gram_from_gradients(grads: Sequence[Tensor]) -> Tensor:
    """The Gram matrix ``K = G G^T`` [T, T] in float64, accumulated bucket by bucket.

    Args:
        grads: buckets of per-task gradients, each [T, ...] with the task on dim 0 (e.g. one per parameter:
            ``[T, *param.shape]``); ``G`` is their concatenation along the flattened remaining dims. float64
            buckets are multiplied in float64; float32 and half-precision ones in float32 over chunks of 2^12
            columns whose T x T products are accumulated in float64.

    Returns:
        float64 [T, T] on the device of the first bucket. float64 products are unaffected by TF32 settings.

    For Aligned-MTL-UB (feature level), pass the gradients of the task losses with respect to the shared
    representation, ``[T, B, ...]``: flattening over batch and features is the statistic of the official ``amtlub``
    balancer (Senushkin et al., 2023), and per-rank results sum to the global-batch matrix under data parallelism.
    """
    if len(grads) == 0:
        raise ValueError('grads is empty: at least one bucket [T, ...] is needed to know T')
    gram: Tensor | None = None
    for index, bucket in enumerate(grads):
        if bucket.dim() < 1:
            raise ValueError(f'grads[{index}] must be [T, ...] with the task on dim 0, got a scalar')
        rows = bucket.detach().reshape(bucket.shape[0], -1)
        if gram is None:
            gram = torch.zeros(rows.shape[0], rows.shape[0], dtype=torch.float64, device=rows.device)
        elif rows.shape[0] != gram.shape[0]:
            raise ValueError(f'grads[{index}] has {rows.shape[0]} task rows, grads[0] has {gram.shape[0]}')
        elif rows.device != gram.device:
            raise ValueError(f'grads[{index}] is on {rows.device}, grads[0] on {gram.device}')
        # float64 buckets are multiplied in float64; others in float32 over chunks of _GRAM_CHUNK columns, each
        # chunk's T x T product added in float64: exact enough (a chunk's rounding is that of a short float32 sum)
        # at the speed of float32 matrix products, which float64 ones on CPUs are not
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
        if rows.dtype == torch.float64:
            gram.addmm_(rows, rows.T)
            continue
        num_chunks = rows.shape[1] // _GRAM_CHUNK
        if num_chunks:  # [chunks, T, columns]: one batched product instead of a Python loop over the chunks
            chunks = rows[:, :num_chunks * _GRAM_CHUNK].reshape(rows.shape[0], num_chunks, _GRAM_CHUNK).transpose(0, 1)
            gram += torch.bmm(chunks, chunks.transpose(1, 2)).to(torch.float64).sum(dim=0)
        rest = rows[:, num_chunks * _GRAM_CHUNK:]
        gram += (rest @ rest.T).to(torch.float64)
    return gram


def combine(weights: Tensor, grads: Sequence[Tensor]) -> list[Tensor]:
    """The update ``w^T G``, bucket by bucket: ``sum_t weights[t] * bucket[t]`` for each bucket [T, ...].

    Each result has the bucket's remaining shape and dtype; the sum runs in at least float32 so that half-precision
    buckets do not round the weights. Non-finite weights give non-finite results. The weights are read to the host
    once (a device sync when they live on a GPU: pass the host weights that the weightings compute from a host
    ``gram`` to avoid it).
    """
    if weights.dim() != 1:
        raise ValueError(f'weights must be a vector [T], got shape {tuple(weights.shape)}')
    for index, bucket in enumerate(grads):
        if bucket.dim() < 1 or bucket.shape[0] != weights.shape[0]:
            raise ValueError(f'grads[{index}] has shape {tuple(bucket.shape)}, expected [{weights.shape[0]}, ...] '
                             f'(one row per weight)')
    # read once for all buckets: weights on a GPU cost one device sync here, host weights none
    coefficients = weights.tolist()
    updates = []
    for bucket in grads:
        # row by row, in place: one pass over the bucket, faster on CPUs than a [1, T] x [T, n] product
        dtype = torch.promote_types(bucket.dtype, torch.float32)
        update = bucket[0].to(dtype) * coefficients[0]
        for row, coefficient in zip(bucket[1:], coefficients[1:]):
            update.add_(row.to(dtype), alpha=coefficient)
        updates.append(update.to(bucket.dtype))
    return updates


def pcgrad_orders(num_tasks: int, generator: torch.Generator | None = None) -> Tensor:
    """Random projection orders for PCGrad: row ``i`` [T - 1] is a random order of the tasks other than ``i``.

    Row ``i`` is ``torch.randperm(T, generator=generator)`` with ``i`` removed, drawn for ``i = 0 .. T-1`` in turn
    (``generator`` must be a CPU generator; None uses the global CPU RNG). This is exactly how torchjd's ``PCGrad``
    draws its orders, so seeding the same RNG replays it. Under data parallelism, draw them from identically seeded
    generators on every rank (or broadcast them) so that every rank applies the same update.
    """
    if num_tasks < 1:
        raise ValueError(f'num_tasks must be >= 1, got {num_tasks}')
    rows = []
    for task in range(num_tasks):
        permutation = torch.randperm(num_tasks, generator=generator)
        rows.append(permutation[permutation != task])
    return torch.stack(rows)


def _check_orders(orders: Tensor, num_tasks: int) -> list[list[int]]:
    if orders.shape != (num_tasks, num_tasks - 1):
        raise ValueError(f'orders must be [T, T-1] = [{num_tasks}, {num_tasks - 1}], got shape '
                         f'{tuple(orders.shape)}')
    rows = orders.tolist()
    for task, row in enumerate(rows):
        if sorted(row) != [other for other in range(num_tasks) if other != task]:
            raise ValueError(f'orders[{task}] = {row} is not an order of the tasks other than {task}')
    return rows


def pcgrad_weights(gram: Tensor, orders: Tensor | None = None, generator: torch.Generator | None = None,
                   reduction: Reduction = 'sum') -> Tensor:
    """PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Algorithm 1) as weights.

    For each task ``i``, ``v = g_i`` is projected, in the order ``orders[i]`` over the other tasks, onto the normal
    plane of every ORIGINAL gradient ``g_j`` it conflicts with: if ``<v, g_j> < 0`` (strictly; ``v`` the running
    projected gradient), ``v <- v - <v, g_j> / ||g_j||^2 g_j``. The update is ``sum_i v_i`` (``reduction='sum'``: the
    paper, LibMTL, torchjd) or its mean over tasks (``'mean'``: the Pytorch-PCGrad package). Task ``i`` is never
    projected onto itself (paper, torchjd; LibMTL also visits ``j = i``). No epsilon is added to ``||g_j||^2``.

    Each ``v_i`` is kept as coefficients ``c_i`` with ``v_i = c_i^T G``, so ``<v_i, g_j> = (K c_i)_j`` and
    ``||g_j||^2 = K_jj``; the returned ``w = sum_i c_i`` (divided by T for ``'mean'``).

    Zero gradients: a task with ``K_jj <= 0`` is never projected against (the projection is undefined; for a true Gram
    matrix its inner products are zero anyway), and a zero ``g_i`` contributes nothing to the update.

    Args:
        gram: ``K`` [T, T].
        orders: [T, T-1] projection orders (see :func:`pcgrad_orders`); drawn from ``generator`` when None.
        generator: CPU generator for the orders when ``orders`` is None (None: the global CPU RNG). They are drawn
            even for a non-finite ``gram``, so generators seeded alike on every rank stay in step.
        reduction: ``'sum'`` or ``'mean'`` over tasks.

    Returns:
        ``w`` float64 [T] on the device of ``gram``; all NaN when ``gram`` is not finite.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f'reduction must be one of {_REDUCTIONS}, got {reduction!r}')
    kernel = _as_gram(gram)
    num_tasks = kernel.shape[0]
    rows = _check_orders(orders, num_tasks) if orders is not None else pcgrad_orders(num_tasks, generator).tolist()
    if not is_finite_gram(kernel):
        # NaN compares false with 0, so without this the loop would skip every projection and return finite weights
        return _non_finite_weights(num_tasks, gram.device)

    k = kernel.tolist()  # plain Python floats are IEEE doubles: the same arithmetic, without per-element tensor ops
    weights = [0.0] * num_tasks
    for task, order in enumerate(rows):
        coeffs = [0.0] * num_tasks
        coeffs[task] = 1.0
        for other in order:
            inner = sum(k[other][m] * coeffs[m] for m in range(num_tasks))
            if inner < 0.0 and k[other][other] > 0.0:
                coeffs[other] -= inner / k[other][other]
        weights = [total + coeff for total, coeff in zip(weights, coeffs)]
    result = torch.tensor(weights, dtype=torch.float64)
    if reduction == 'mean':
        result = result / num_tasks
    return _on_device_of(result, gram)


def _kept_eigenpairs(kernel: Tensor, tolerance: float | None) -> tuple[Tensor, Tensor] | None:
    """Eigenvalues above the tolerance, descending, and their eigenvectors (columns); None if ``eigh`` fails."""
    num_tasks = kernel.shape[0]
    try:
        # symmetrised because an accumulated K need not be bitwise symmetric, and eigh reads one triangle only
        eigenvalues, eigenvectors = torch.linalg.eigh((kernel + kernel.T) / 2)
    except torch.linalg.LinAlgError:
        return None
    largest = eigenvalues[-1]
    relative = num_tasks * _EPS64 if tolerance is None else tolerance
    keep = eigenvalues > relative * largest if largest > 0 else torch.zeros_like(eigenvalues, dtype=torch.bool)
    return eigenvalues[keep].flip(0), eigenvectors[:, keep].flip(1)


def _check_tolerance(tolerance: float | None) -> None:
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f'tolerance must be a finite number >= 0 (relative to the largest eigenvalue) or None, '
                         f'got {tolerance!r}')


def aligned_mtl_weights(gram: Tensor, preference: Tensor | None = None, scale_mode: ScaleMode = 'min',
                        tolerance: float | None = None) -> Tensor:
    """Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023) as weights.

    With ``K = V diag(lambda) V^T``, the eigenpairs with ``lambda > tolerance * lambda_max`` are kept (``r`` of
    them) and ``B = sqrt(scale) V_r diag(lambda_r^-1/2) V_r^T`` (symmetric). The aligned task gradients ``B G`` are
    the rows of the scaled polar factor of ``G``: for full rank they are orthogonal with equal norms
    ``sqrt(scale)``. The update is ``p^T B G``, so the returned weights are ``w = B p``.

    * ``scale``: the smallest kept eigenvalue (``'min'``, the paper's ``sigma_min^2``), ``torch.median`` of the kept
      eigenvalues (``'median'``: the lower middle one for an even count), or their mean (``'rmse'``: the squared
      root-mean-square singular value), as in the official SamsungLabs/MTL ``ProcrustesSolver``.
    * ``preference`` defaults to ones: the aligned gradients are SUMMED, as in the official code and LibMTL.
      torchjd's ``AlignedMTL`` defaults to ``1/T`` (their mean): its update is this one divided by T.
    * ``tolerance`` is relative to the largest eigenvalue; None means ``T * eps`` with eps of float64 (2.2e-16), the
      rule of the official code and torchjd evaluated in float64. The official code ran it with float32's eps on a
      float32 K (``tolerance=T * torch.finfo(torch.float32).eps`` reproduces that): a task whose gradient norm is
      1e-4 of the others then falls below the tolerance and is dropped, while under the float64 default it is kept
      and, with ``'min'``, shrinks the whole update to its scale. The kept rank and smallest eigenvalue are in
      :func:`gram_diagnostics`.
    * Nothing kept (``K = 0``): ``B`` is the identity (as torchjd), so ``w = p``; the update ``w^T G`` is zero.
      A zero gradient row is dropped with its null eigenvalue: its weight is 0 and the other weights are those of
      ``K`` without it.

    Aligned-MTL-UB applies this same function to the Gram matrix of the gradients with respect to the shared
    representation (see :func:`gram_from_gradients`) and backpropagates ``sum_t w_t L_t`` through the encoder.

    Args:
        gram: ``K`` [T, T].
        preference: task preference ``p`` [T] (default ones).
        scale_mode: ``'min'``, ``'median'`` or ``'rmse'``.
        tolerance: relative eigenvalue cut-off, see above.

    Returns:
        ``w`` float64 [T] on the device of ``gram``; all NaN when ``gram`` is not finite.
    """
    if scale_mode not in _SCALE_MODES:
        raise ValueError(f'scale_mode must be one of {_SCALE_MODES}, got {scale_mode!r}')
    _check_tolerance(tolerance)
    kernel = _as_gram(gram)
    num_tasks = kernel.shape[0]
    if preference is None:
        pref = torch.ones(num_tasks, dtype=torch.float64)
    else:
        if preference.shape != (num_tasks,):
            raise ValueError(f'preference must be [T] = [{num_tasks}], got shape {tuple(preference.shape)}')
        pref = preference.detach().to(device='cpu', dtype=torch.float64)
        if not torch.isfinite(pref).all():
            raise ValueError(f'preference must be finite, got {preference.tolist()}')
    if not is_finite_gram(kernel):
        return _non_finite_weights(num_tasks, gram.device)
    kept = _kept_eigenpairs(kernel, tolerance)
    if kept is None:
        return _non_finite_weights(num_tasks, gram.device)
    eigenvalues, eigenvectors = kept
    if eigenvalues.numel() == 0:
        return _on_device_of(pref, gram)
    if scale_mode == 'min':
        scale = eigenvalues[-1]
    elif scale_mode == 'median':
        scale = eigenvalues.median()
    else:
        scale = eigenvalues.mean()
    balance = scale.sqrt() * (eigenvectors * eigenvalues.rsqrt()) @ eigenvectors.T
    return _on_device_of(balance @ pref, gram)


def gram_diagnostics(gram: Tensor, tolerance: float | None = None) -> dict:
    """What to log about a step's task gradients, from their Gram matrix alone.

    Returns a dict with ``finite`` (bool), ``norms`` (float64 [T], ``||g_t||``), ``cosines`` (float64 [T, T],
    pairwise cosine similarities; 0 in every row and column of a zero gradient), ``rank`` (int, eigenvalues kept
    under :func:`aligned_mtl_weights`' ``tolerance`` rule), ``min_eigenvalue`` and ``max_eigenvalue`` (floats: the
    smallest kept and the largest eigenvalue of K, i.e. ``sigma_min^2`` and ``sigma_max^2`` of G; 0.0 when nothing is
    kept). For a non-finite ``gram`` everything but ``finite`` and ``rank`` (0) is NaN. Tensors are on the CPU.
    """
    _check_tolerance(tolerance)
    kernel = _as_gram(gram)
    num_tasks = kernel.shape[0]
    if not is_finite_gram(kernel):
        nan = torch.full((num_tasks,), math.nan, dtype=torch.float64)
        return dict(finite=False, norms=nan, cosines=torch.outer(nan, nan), rank=0, min_eigenvalue=math.nan,
                    max_eigenvalue=math.nan)
    norms = kernel.diagonal().clamp(min=0).sqrt()
    denominator = torch.outer(norms, norms)
    cosines = torch.where(denominator > 0, kernel / denominator.clamp(min=torch.finfo(torch.float64).tiny),
                          torch.zeros_like(kernel))
    kept = _kept_eigenpairs(kernel, tolerance)
    eigenvalues = kept[0] if kept is not None else torch.full((1,), math.nan, dtype=torch.float64)
    return dict(
        finite=True,
        norms=norms,
        cosines=cosines,
        rank=int(eigenvalues.numel()) if kept is not None else 0,
        min_eigenvalue=float(eigenvalues[-1]) if eigenvalues.numel() else 0.0,
        max_eigenvalue=float(eigenvalues[0]) if eigenvalues.numel() else 0.0,
    )


class PCGradWeighting:
    """PCGrad weights with a seeded order generator of its own (identical seeds give identical orders on all ranks).

    ``weighting(gram)`` is :func:`pcgrad_weights` with orders drawn from the internal generator; ``state_dict`` /
    ``load_state_dict`` save and restore that generator so that a resumed run draws the orders it would have drawn.
    """

    def __init__(self, reduction: Reduction = 'sum', seed: int = 0):
        if reduction not in _REDUCTIONS:
            raise ValueError(f'reduction must be one of {_REDUCTIONS}, got {reduction!r}')
        self.reduction = reduction
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, gram: Tensor) -> Tensor:
        return pcgrad_weights(gram, generator=self.generator, reduction=self.reduction)

    def state_dict(self) -> dict[str, Tensor]:
        return {'generator': self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state['generator'])


class AlignedMTLWeighting:
    """:func:`aligned_mtl_weights` with its options fixed: ``weighting(gram) -> w``. Stateless."""

    def __init__(self, preference: Tensor | None = None, scale_mode: ScaleMode = 'min',
                 tolerance: float | None = None):
        if scale_mode not in _SCALE_MODES:
            raise ValueError(f'scale_mode must be one of {_SCALE_MODES}, got {scale_mode!r}')
        _check_tolerance(tolerance)
        self.preference = preference
        self.scale_mode = scale_mode
        self.tolerance = tolerance

    def __call__(self, gram: Tensor) -> Tensor:
        return aligned_mtl_weights(gram, self.preference, self.scale_mode, self.tolerance)
