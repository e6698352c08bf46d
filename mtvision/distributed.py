"""torch.distributed helpers shared by training, probes and losses; every one also works without a process group
(a single process is a world of one)."""
import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ['collective_device', 'distributed_session', 'gather_with_grad', 'rank_and_world', 'setup_distributed']


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones
    if dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def setup_distributed(launcher: str) -> torch.device:
    """Initialise ``torch.distributed`` for ``launcher='pytorch'`` from the torchrun environment (NCCL on CUDA,
    gloo on CPU) and return this process's device; ``'none'`` only returns the device."""
    if launcher not in ('none', 'pytorch'):
        raise ValueError(f"launcher must be 'none' or 'pytorch', got {launcher!r}")
    if launcher == 'none':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if torch.cuda.is_available():
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
        dist.init_process_group(backend='nccl')
        return device
    dist.init_process_group(backend='gloo')
    return torch.device('cpu')


@contextlib.contextmanager
def distributed_session(launcher: str) -> Iterator[tuple[torch.device, int]]:
    """:func:`setup_distributed`, then ``(device, rank)`` for the body; the process group is torn down on the
    way out, also when the body raises."""
    device = setup_distributed(launcher)
    try:
        yield device, dist.get_rank() if dist.is_initialized() else 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: Tensor) -> Tensor:
        rank, world = rank_and_world()
        ctx.rank, ctx.rows = rank, local.shape[0]
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # every rank's loss depends on this rank's rows (as negatives, keys...): sum their gradients here, so that
        # DDP's average over ranks of the local gradients equals the gradient of the global-batch loss
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(local: Tensor) -> Tensor:
    """Every rank's ``local`` rows concatenated in rank order (all ranks must pass the same shape).

    Gradients flow back to the local rows only, but carry every rank's use of them: the backward all-reduces (sums)
    the gradient of the gathered tensor before taking this rank's slice. With a loss that is the mean of per-rank
    losses (DDP averages gradients), the update equals single-process training on the global batch. Without a
    process group it returns ``local`` itself.
    """
    _, world = rank_and_world()
    if world == 1:
        return local
    return _GatherWithGrad.apply(local)
