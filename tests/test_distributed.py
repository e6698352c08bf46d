"""Cross-rank collectives with gradients: 2 gloo processes must optimise the single-process loss (contrastive
negatives, global BatchNorm)."""
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mtvision.distributed import gather_with_grad, rank_and_world
from mtvision.models.heads.contrastive import GlobalBatchNorm1d, info_nce_loss, nt_xent_loss

WORLD_SIZE = 2
BATCH = 3  # images per rank


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two views of WORLD_SIZE * BATCH images, and MoCo-style queries; the same on every process."""
    generator = torch.Generator().manual_seed(0)
    n = WORLD_SIZE * BATCH
    view1, view2, queries = (F.normalize(torch.randn(n, 5, generator=generator), dim=-1) for _ in range(3))
    return view1, view2, queries


def losses(view1, view2, queries) -> tuple[torch.Tensor, torch.Tensor]:
    return nt_xent_loss(torch.cat([view1, view2]), 0.3), info_nce_loss(queries, view2, 0.3)


def run_rank(rank: int, port: int, out_dir) -> None:
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=WORLD_SIZE)
    try:
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        local = [t[rows].clone().requires_grad_() for t in global_batch()]
        nt_xent, info_nce = losses(*local)
        (nt_xent + info_nce).backward()
        gathered = gather_with_grad(local[0].detach())
        torch.save(dict(nt_xent=nt_xent.detach(), info_nce=info_nce.detach(), grads=[t.grad for t in local],
                        gathered=gathered, rank_and_world=rank_and_world()), out_dir / f'rank{rank}.pt')
    finally:
        dist.destroy_process_group()


def test_two_ranks_optimise_the_global_batch_loss(tmp_path):
    mp.spawn(run_rank, args=(free_port(), tmp_path), nprocs=WORLD_SIZE, join=True)
    inputs = [t.clone().requires_grad_() for t in global_batch()]
    nt_xent, info_nce = losses(*inputs)
    (nt_xent + info_nce).backward()
    results = [torch.load(tmp_path / f'rank{rank}.pt', weights_only=True) for rank in range(WORLD_SIZE)]

    for rank, result in enumerate(results):
        assert result['rank_and_world'] == (rank, WORLD_SIZE)
        torch.testing.assert_close(result['gathered'], global_batch()[0])  # rank order
    # each rank's loss is the mean over its rows, so the ranks' mean is the global loss...
    torch.testing.assert_close(sum(r['nt_xent'] for r in results) / WORLD_SIZE, nt_xent.detach())
    torch.testing.assert_close(sum(r['info_nce'] for r in results) / WORLD_SIZE, info_nce.detach())
    # ...and the local gradients, once DDP divides them by the world size, are the global gradient's slices: they
    # include the other rank's use of these rows as negatives (a gather without that would miss those terms)
    for rank, result in enumerate(results):
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        for local_grad, full in zip(result['grads'], inputs):
            torch.testing.assert_close(local_grad / WORLD_SIZE, full.grad[rows])


def test_a_single_process_gathers_nothing():
    local = torch.randn(2, 3)
    assert gather_with_grad(local) is local
    assert rank_and_world() == (0, 1)


def batch_norm_rank(rank: int, port: int, out_dir) -> None:
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=WORLD_SIZE)
    try:
        features, readout = bn_batch()
        norm = GlobalBatchNorm1d(features.shape[1])
        local = features[rank * BATCH:(rank + 1) * BATCH].clone().requires_grad_()
        out = norm(local)
        # each rank's loss its rows' share of the global mean: the ranks' average is the global loss
        (WORLD_SIZE * (out * readout[rank * BATCH:(rank + 1) * BATCH]).sum() / len(features)).backward()
        torch.save(dict(out=out.detach(), grad=local.grad, weight_grad=norm.weight.grad,
                        running_var=norm.running_var), out_dir / f'bn{rank}.pt')
    finally:
        dist.destroy_process_group()


def bn_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    n = WORLD_SIZE * BATCH
    return torch.randn(n, 4, generator=generator) * 3 + 5, torch.randn(n, 4, generator=generator)


def test_global_batch_norm_normalises_with_the_statistics_of_every_ranks_rows(tmp_path):
    mp.spawn(batch_norm_rank, args=(free_port(), tmp_path), nprocs=WORLD_SIZE, join=True)
    features, readout = bn_batch()
    reference = torch.nn.BatchNorm1d(features.shape[1])
    inputs = features.clone().requires_grad_()
    out = reference(inputs)
    ((out * readout).sum() / len(features)).backward()
    results = [torch.load(tmp_path / f'bn{rank}.pt', weights_only=True) for rank in range(WORLD_SIZE)]

    torch.testing.assert_close(torch.cat([r['out'] for r in results]), out.detach())
    # the global loss is the ranks' mean, so its gradient is each rank's gradient over the ranks, as the parameters'
    # gradients averaged over the ranks (what the trainer does) are the global batch's
    torch.testing.assert_close(torch.cat([r['grad'] for r in results]) / WORLD_SIZE, inputs.grad)
    torch.testing.assert_close(sum(r['weight_grad'] for r in results) / WORLD_SIZE, reference.weight.grad)
    for result in results:
        torch.testing.assert_close(result['running_var'], reference.running_var)
