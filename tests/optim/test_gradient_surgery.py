"""Gram-matrix PCGrad and Aligned-MTL against P-space references written from the papers, and against torchjd."""
import math

import pytest
import torch
from torchjd.aggregation import AlignedMTL, PCGrad

from mtvision.optim.gradient_surgery import (AlignedMTLWeighting, PCGradWeighting, aligned_mtl_weights, combine,
                                             gram_diagnostics, gram_from_gradients, is_finite_gram, pcgrad_orders,
                                             pcgrad_weights)

P = 50
EPS64 = torch.finfo(torch.float64).eps


# ---------------------------------------------------------------- references in P-space (float64, from the papers)

def reference_pcgrad(grads: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """Yu et al. 2020, Algorithm 1, on the gradient vectors themselves; sum over tasks."""
    update = torch.zeros_like(grads[0])
    for i, order in enumerate(orders):
        v = grads[i].clone()
        for j in order:
            inner = torch.dot(v, grads[j])
            if inner < 0:
                v = v - inner / torch.dot(grads[j], grads[j]) * grads[j]
        update += v
    return update


def reference_aligned_mtl(grads: torch.Tensor, preference: torch.Tensor, scale_mode: str = 'min',
                          tolerance: float | None = None) -> torch.Tensor:
    """Senushkin et al. 2023 through the SVD of G (never forming G G^T): aligned G = sqrt(scale) U_r W_r^T."""
    u, sigma, wt = torch.linalg.svd(grads, full_matrices=False)
    squared = sigma ** 2
    keep = squared > (len(grads) * EPS64 if tolerance is None else tolerance) * squared[0]
    u, squared, wt = u[:, keep], squared[keep], wt[keep]
    scale = {'min': squared[-1], 'median': squared.median(), 'rmse': squared.mean()}[scale_mode]
    aligned = scale.sqrt() * u @ wt
    return preference @ aligned


def random_grads(num_tasks: int, seed: int, spread: float = 0.0, dim: int = P) -> torch.Tensor:
    """Gaussian rows with a common component (so that some pairs conflict and some agree), norms 10^0..10^spread."""
    generator = torch.Generator().manual_seed(seed)
    grads = torch.randn(num_tasks, dim, generator=generator, dtype=torch.float64)
    grads += 0.3 * torch.randn(1, dim, generator=generator, dtype=torch.float64)
    grads /= grads.norm(dim=1, keepdim=True)
    return grads * torch.logspace(0, spread, num_tasks, dtype=torch.float64).unsqueeze(1)


def special_cases() -> dict[str, torch.Tensor]:
    g = random_grads(5, seed=100)
    return {
        'parallel': torch.stack([g[0], 4 * g[0], g[1]]),  # 4 is a power of two: exactly parallel
        'opposite': torch.stack([g[0], -g[0]]),
        'opposite_plus_third': torch.stack([g[0], -g[0], g[2]]),
        'zero_gradient': torch.stack([g[0], torch.zeros(P, dtype=torch.float64), g[1], g[2]]),
        'rank_deficient': torch.stack([g[0], g[1], g[2], g[0] + g[1]]),
        'decades': random_grads(5, seed=101, spread=2.0),
    }


def assert_close_update(actual: torch.Tensor, expected: torch.Tensor, grads: torch.Tensor, rtol: float):
    """|actual - expected| within rtol of the size of the problem (the largest task norm, or the reference)."""
    scale = max(float(grads.norm(dim=1).max()), float(expected.norm()))
    error = float((actual - expected).norm())
    assert error <= rtol * scale, f'error {error:.3g} > {rtol:g} * {scale:.3g}'


CASES = [(f'random_T{t}_s{s}', random_grads(t, seed=10 * t + s)) for t in range(2, 7) for s in range(3)]
CASES += list(special_cases().items())


# ---------------------------------------------------------------------------------------------- PCGrad

@pytest.mark.parametrize('name,grads', CASES, ids=[name for name, _ in CASES])
def test_pcgrad_matches_paper_loop(name, grads):
    generator = torch.Generator().manual_seed(7)
    for _ in range(3):  # several random orders per case
        orders = pcgrad_orders(len(grads), generator)
        w = pcgrad_weights(grads @ grads.T, orders=orders)
        expected = reference_pcgrad(grads, orders.tolist())
        assert_close_update(w @ grads, expected, grads, rtol=1e-10)
        mean = pcgrad_weights(grads @ grads.T, orders=orders, reduction='mean')
        torch.testing.assert_close(mean, w / len(grads), rtol=1e-15, atol=0)


def test_pcgrad_hand_computed():
    # g1 = (1, 0), g2 = (-1, 1) conflict: g1' = g1 + g2 / 2 = (1/2, 1/2), g2' = g2 + g1 = (0, 1); sum = (1/2, 3/2)
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    w = pcgrad_weights(grads @ grads.T, orders=torch.tensor([[1], [0]]))
    assert w.tolist() == [2.0, 1.5]
    assert (w @ grads).tolist() == [0.5, 1.5]


def test_pcgrad_orders_are_permutations_of_the_others_and_replayable():
    orders = pcgrad_orders(5, torch.Generator().manual_seed(3))
    for i, row in enumerate(orders.tolist()):
        assert sorted(row) == [j for j in range(5) if j != i]
    grads = random_grads(5, seed=4)
    gram = grads @ grads.T
    drawn = pcgrad_weights(gram, generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, pcgrad_weights(gram, orders=orders))


def test_pcgrad_zero_gradient_rule():
    # a zero g_j is never projected against and a zero g_i adds nothing: the others are as if it were absent
    grads = special_cases()['zero_gradient']
    orders = torch.tensor([[1, 2, 3], [0, 2, 3], [3, 1, 0], [0, 1, 2]])
    w = pcgrad_weights(grads @ grads.T, orders=orders)
    present = grads[[0, 2, 3]]
    reduced = pcgrad_weights(present @ present.T, orders=torch.tensor([[1, 2], [2, 0], [0, 1]]))
    assert w[1] == 1.0  # its own coefficient, multiplying a zero row
    torch.testing.assert_close(w[[0, 2, 3]], reduced, rtol=1e-12, atol=0)


def test_pcgrad_weighting_state_round_trip():
    grads = random_grads(4, seed=5)
    gram = grads @ grads.T
    weighting = PCGradWeighting(seed=11)
    weighting(gram)
    state = weighting.state_dict()
    expected = [weighting(gram) for _ in range(4)]
    resumed = PCGradWeighting(seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed(gram), w) for w in expected)
    fresh = pcgrad_weights(gram, generator=torch.Generator().manual_seed(11))
    assert torch.equal(PCGradWeighting(seed=11)(gram), fresh)


# ---------------------------------------------------------------------------------------------- Aligned-MTL

@pytest.mark.parametrize('name,grads', CASES, ids=[name for name, _ in CASES])
@pytest.mark.parametrize('scale_mode', ['min', 'median', 'rmse'])
def test_aligned_mtl_matches_svd_reference(name, grads, scale_mode):
    preference = torch.ones(len(grads), dtype=torch.float64)
    if name.endswith('s2'):  # a non-uniform preference on some of the random cases
        preference = torch.linspace(0.5, 2.0, len(grads), dtype=torch.float64)
    w = aligned_mtl_weights(grads @ grads.T, preference, scale_mode=scale_mode)
    expected = reference_aligned_mtl(grads, preference, scale_mode)
    assert_close_update(w @ grads, expected, grads, rtol=1e-10)


def test_aligned_mtl_hand_computed_orthogonal():
    # orthogonal g_t of norms a_t: B = sqrt(scale) diag(1/a_t), aligned gradients g_t * sqrt(scale) / a_t
    norms = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    gram = torch.diag(norms ** 2)
    torch.testing.assert_close(aligned_mtl_weights(gram, scale_mode='min'), 1.0 / norms, rtol=1e-14, atol=0)
    torch.testing.assert_close(aligned_mtl_weights(gram, scale_mode='median'), 2.0 / norms, rtol=1e-14, atol=0)
    rms = math.sqrt((1 + 4 + 25) / 3)
    torch.testing.assert_close(aligned_mtl_weights(gram, scale_mode='rmse'), rms / norms, rtol=1e-14, atol=0)


def test_aligned_mtl_zero_gradient_equals_dropping_the_task():
    grads = special_cases()['zero_gradient']
    w = aligned_mtl_weights(grads @ grads.T)
    present = grads[[0, 2, 3]]
    assert abs(w[1]) < 1e-12  # zero up to the rounding of the other eigenvectors; it multiplies a zero row anyway
    torch.testing.assert_close(w[[0, 2, 3]], aligned_mtl_weights(present @ present.T), rtol=1e-10, atol=0)


def test_tolerance_decides_whether_a_tiny_task_is_kept():
    grads = random_grads(3, seed=8)
    grads[2] *= 1e-4  # eigenvalue ratio ~1e-8: above T * eps(float64), below T * eps(float32)
    gram = grads @ grads.T
    assert gram_diagnostics(gram)['rank'] == 3
    assert gram_diagnostics(gram, tolerance=3 * torch.finfo(torch.float32).eps)['rank'] == 2
    float32_rule = 3 * torch.finfo(torch.float32).eps
    ones = torch.ones(3, dtype=torch.float64)
    kept = aligned_mtl_weights(gram) @ grads
    dropped = aligned_mtl_weights(gram, tolerance=float32_rule) @ grads
    assert_close_update(kept, reference_aligned_mtl(grads, ones), grads, 1e-10)
    assert_close_update(dropped, reference_aligned_mtl(grads, ones, tolerance=float32_rule), grads, 1e-10)
    assert kept.norm() < 1e-3 * dropped.norm()  # 'min' ties the whole step to the smallest kept singular value


# ---------------------------------------------------------------------------------------------- both methods

def test_single_task_weight_is_one():
    for gram in (torch.tensor([[3.0]]), torch.tensor([[0.0]])):
        assert pcgrad_weights(gram).tolist() == [1.0]
        assert pcgrad_orders(1).shape == (1, 0)
        for mode in ('min', 'median', 'rmse'):
            assert aligned_mtl_weights(gram, scale_mode=mode).tolist() == [1.0]


@pytest.mark.parametrize('scale', [2.0 ** 16, 1e-3])
def test_weights_invariant_to_a_common_loss_scale(scale):
    grads = random_grads(5, seed=9, spread=1.0)
    gram = grads @ grads.T
    scaled = (scale * grads) @ (scale * grads).T
    orders = pcgrad_orders(5, torch.Generator().manual_seed(1))
    torch.testing.assert_close(pcgrad_weights(scaled, orders), pcgrad_weights(gram, orders), rtol=1e-12, atol=0)
    for mode in ('min', 'median', 'rmse'):
        torch.testing.assert_close(aligned_mtl_weights(scaled, scale_mode=mode),
                                   aligned_mtl_weights(gram, scale_mode=mode), rtol=1e-10, atol=0)


@pytest.mark.parametrize('bad', [math.inf, -math.inf, math.nan])
def test_non_finite_gram_gives_non_finite_weights_without_raising(bad):
    grads = random_grads(3, seed=12)
    gram = (grads @ grads.T).float()
    gram[0, 1] = gram[1, 0] = bad
    assert not is_finite_gram(gram) and is_finite_gram(grads @ grads.T)
    for weights in (pcgrad_weights(gram), aligned_mtl_weights(gram), PCGradWeighting()(gram),
                    AlignedMTLWeighting(scale_mode='rmse')(gram)):
        assert weights.shape == (3,) and weights.isnan().all()
        assert not combine(weights, [grads.float()])[0].isfinite().any()
    diagnostics = gram_diagnostics(gram)
    assert diagnostics['finite'] is False and math.isnan(diagnostics['min_eigenvalue'])


def test_weights_keep_the_gram_device_and_are_float64():
    gram = random_grads(3, seed=13).float() @ random_grads(3, seed=13).float().T
    for weights in (pcgrad_weights(gram), aligned_mtl_weights(gram)):
        assert weights.dtype == torch.float64 and weights.device == gram.device


# ---------------------------------------------------------------------------------------------- helpers

def test_gram_from_buckets_and_combine_round_trip():
    generator = torch.Generator().manual_seed(14)
    buckets = [torch.randn(4, 3, 5, generator=generator), torch.randn(4, 7, generator=generator),
               torch.randn(4, 2, 2, 2, generator=generator).half()]
    flat = torch.cat([b.reshape(4, -1).double() for b in buckets], dim=1)
    gram = gram_from_gradients(buckets)
    assert gram.dtype == torch.float64
    naive = torch.tensor([[sum(float(a) * float(b) for a, b in zip(flat[i], flat[j])) for j in range(4)]
                          for i in range(4)], dtype=torch.float64)
    # float32 / float16 buckets: float32 products per chunk, accumulated in float64
    torch.testing.assert_close(gram, naive, rtol=1e-6, atol=1e-6)
    # float64 buckets stay float64 throughout
    torch.testing.assert_close(gram_from_gradients([b.double() for b in buckets]), naive, rtol=1e-13, atol=0)

    weights = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)
    updates = combine(weights, buckets)
    assert [u.shape for u in updates] == [b.shape[1:] for b in buckets]
    assert [u.dtype for u in updates] == [b.dtype for b in buckets]
    for update, bucket in zip(updates, buckets):
        expected = sum(float(weights[t]) * bucket[t].double() for t in range(4))
        tol = 1e-3 if bucket.dtype == torch.float16 else 1e-6
        torch.testing.assert_close(update.double(), expected, rtol=tol, atol=tol)


def test_gram_diagnostics_against_direct_computation():
    grads = special_cases()['rank_deficient']
    grads = torch.cat([grads, torch.zeros(1, P, dtype=torch.float64)])  # and a zero row
    diagnostics = gram_diagnostics(grads @ grads.T)
    torch.testing.assert_close(diagnostics['norms'], grads.norm(dim=1), rtol=1e-12, atol=1e-15)
    for i in range(5):
        for j in range(5):
            expected = 0.0 if i == 4 or j == 4 else float(torch.nn.functional.cosine_similarity(grads[i], grads[j],
                                                                                                dim=0))
            assert diagnostics['cosines'][i, j].item() == pytest.approx(expected, abs=1e-12)
    sigma = torch.linalg.svdvals(grads)
    assert diagnostics['finite'] is True and diagnostics['rank'] == 3
    assert diagnostics['min_eigenvalue'] == pytest.approx(float(sigma[2] ** 2), rel=1e-10)
    assert diagnostics['max_eigenvalue'] == pytest.approx(float(sigma[0] ** 2), rel=1e-12)


def test_bad_input_is_named():
    gram = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r'square matrix \[T, T\], got shape \(3, 2\)'):
        pcgrad_weights(torch.ones(3, 2))
    with pytest.raises(TypeError, match='floating-point'):
        aligned_mtl_weights(torch.eye(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"reduction must be one of \('sum', 'mean'\), got 'avg'"):
        pcgrad_weights(gram, reduction='avg')
    with pytest.raises(ValueError, match=r'orders must be \[T, T-1\] = \[3, 2\], got shape \(3, 3\)'):
        pcgrad_weights(gram, orders=torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r'orders\[1\] = \[1, 2\] is not an order of the tasks other than 1'):
        pcgrad_weights(gram, orders=torch.tensor([[1, 2], [1, 2], [0, 1]]))
    with pytest.raises(ValueError, match="scale_mode must be one of .* got 'max'"):
        aligned_mtl_weights(gram, scale_mode='max')
    with pytest.raises(ValueError, match=r'preference must be \[T\] = \[3\], got shape \(2,\)'):
        aligned_mtl_weights(gram, preference=torch.ones(2))
    with pytest.raises(ValueError, match='tolerance must be a finite number >= 0'):
        aligned_mtl_weights(gram, tolerance=-1.0)
    with pytest.raises(ValueError, match=r'grads\[1\] has 2 task rows, grads\[0\] has 3'):
        gram_from_gradients([torch.ones(3, 4), torch.ones(2, 4)])
    with pytest.raises(ValueError, match=r'grads\[0\] has shape \(2, 4\), expected \[3, ...\]'):
        combine(torch.ones(3), [torch.ones(2, 4)])


# ---------------------------------------------------------------------------------------------- torchjd 0.18.0

TORCHJD_P = 200


@pytest.mark.parametrize('num_tasks', range(2, 7))
def test_pcgrad_matches_torchjd_with_replayed_orders(num_tasks):
    # torchjd's PCGradWeighting draws torch.randperm(T) from the global CPU RNG once per task, in task order
    jacobian = random_grads(num_tasks, seed=200 + num_tasks, spread=1.0, dim=TORCHJD_P).float()
    for seed in range(3):
        torch.manual_seed(seed)
        expected = PCGrad()(jacobian)
        torch.manual_seed(seed)
        orders = pcgrad_orders(num_tasks)
        update, = combine(pcgrad_weights(gram_from_gradients([jacobian]), orders), [jacobian])
        torch.testing.assert_close(update, expected, rtol=1e-5, atol=1e-5 * float(expected.norm()))


@pytest.mark.parametrize('num_tasks', range(2, 7))
@pytest.mark.parametrize('scale_mode', ['min', 'median', 'rmse'])
def test_aligned_mtl_matches_torchjd_sum_and_mean(num_tasks, scale_mode):
    jacobian = random_grads(num_tasks, seed=300 + num_tasks, spread=2.0, dim=TORCHJD_P).float()
    update, = combine(aligned_mtl_weights(gram_from_gradients([jacobian]), scale_mode=scale_mode), [jacobian])
    # float32 eigen-solver noise with norms over two decades, as measured: rtol 1e-3
    ones = AlignedMTL(pref_vector=torch.ones(num_tasks), scale_mode=scale_mode)(jacobian)
    torch.testing.assert_close(update, ones, rtol=1e-3, atol=1e-3 * float(update.norm()))
    mean = AlignedMTL(scale_mode=scale_mode)(jacobian)  # torchjd's default preference 1/T: the mean
    torch.testing.assert_close(update, num_tasks * mean, rtol=1e-3, atol=1e-3 * float(update.norm()))


def test_gram_of_a_bucket_longer_than_one_chunk_matches_float64():
    generator = torch.Generator().manual_seed(15)
    bucket = torch.randn(3, 600_001, generator=generator)  # 146 full chunks of 2^12 columns and a partial one
    reference = bucket.double() @ bucket.double().T
    error = (gram_from_gradients([bucket]) - reference).abs() / torch.outer(reference.diagonal(),
                                                                            reference.diagonal()).sqrt()
    assert error.max() < 5e-7  # float32 rounding, relative to the gradients' norms
