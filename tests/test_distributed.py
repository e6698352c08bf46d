"""Cross-rank gathering of contrastive negatives: 2 gloo processes must optimise the single-process loss."""
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mtvision.distributed import gather_with_grad, rank_and_world
from mtvision.models.heads.contrastive import info_nce_loss, nt_xent_loss

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
