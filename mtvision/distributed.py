"""torch.distributed helpers shared by training, probes and losses; every one also works without a process group
(a single process is a world of one)."""
import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ['all_gather_objects', 'all_reduce_gradients', 'average_over_ranks', 'broadcast_module', 'collective_device',
           'distributed_session', 'gather_with_grad', 'sum_with_grad', 'is_main_process', 'max_over_ranks', 'mean_across_ranks',
           'rank_and_world', 'setup_distributed', 'sum_over_ranks']


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0 (or a single process): the one that writes logs, metrics, pictures and checkpoints."""
    return rank_and_world()[0] == 0


def collective_device() -> torch.device:
    """The device whose tensors the default process group's collectives take, and so where every collective of
    mtvision runs: the CPU when the group serves CPU tensors (gloo), else the device type it serves on this
    process (NCCL, or a backend bound to CUDA such as ``'cuda:gloo'``: this process's CUDA device)."""
    device_types = [entry.split(':')[0] for entry in dist.get_backend_config().split(',')]
    if 'cpu' in device_types:
        return torch.device('cpu')
    if device_types[0] == 'cuda':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device(device_types[0])


def _in_place_on_collective_device(collective, tensor: Tensor, *args, **kwargs) -> None:
    """``collective(tensor, ...)`` (an in-place all_reduce or broadcast) run on :func:`collective_device`, through a
    copy when ``tensor`` lives elsewhere."""
    device = collective_device()
    if tensor.device == device:
        collective(tensor, *args, **kwargs)
        return
    moved = tensor.to(device)
    collective(moved, *args, **kwargs)
    tensor.copy_(moved)


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
        sent = local.to(collective_device()).contiguous()
        parts = [torch.empty_like(sent) for _ in range(world)]
        dist.all_gather(parts, sent)
        return torch.cat(parts).to(local.device)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # every rank's loss depends on this rank's rows (as negatives, keys...): sum their gradients here, so that
        # DDP's average over ranks of the local gradients equals the gradient of the global-batch loss
        grad = grad.contiguous().clone()
        _in_place_on_collective_device(dist.all_reduce, grad)
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


class _SumWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: Tensor) -> Tensor:
        total = local.to(collective_device(), copy=True)
        dist.all_reduce(total)
        return total.to(local.device)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # every rank's loss depends on the sum, so on this rank's term: its gradient is the sum of theirs
        total = grad.to(collective_device(), copy=True)
        dist.all_reduce(total)
        return total.to(grad.device)


def sum_with_grad(local: Tensor) -> Tensor:
    """``local`` summed over the ranks, differentiable: the gradient of each rank's term carries every rank's use
    of the sum (as :func:`gather_with_grad`), so that averaging the ranks' gradients gives the gradient of the
    global batch's loss. ``local`` itself without a process group."""
    _, world = rank_and_world()
    if world == 1:
        return local
    return _SumWithGrad.apply(local)


@torch.no_grad()
def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Average ``.grad`` over the ranks, in place, in one collective per dtype.

    The multi-task trainer's replacement for DistributedDataParallel's reducer: a step runs one forward per task
    and tasks may be absent from it, which DDP's per-forward bookkeeping does not allow (a head unused in a step
    would hang it). A parameter whose gradient is None on every rank stays None (the optimizer skips it, as a
    single process on the global batch would); one that has a gradient on some rank gets the average, with zeros
    for the ranks that had none. Every rank must pass the same parameters in the same order.
    """
    _, world = rank_and_world()
    params = [p for p in parameters if p.requires_grad]
    if world == 1 or not params:
        return
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=collective_device())
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    reduced = [p for p, flag in zip(params, has_grad.tolist()) if flag]
    for p in reduced:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    average_over_ranks([p.grad for p in reduced])


@torch.no_grad()
def average_over_ranks(tensors: Sequence[Tensor]) -> None:
    """Replace each tensor, in place, by its mean over the ranks, in one collective per dtype (no-op in a single
    process). Every rank must pass tensors of the same shapes in the same order."""
    _, world = rank_and_world()
    if world == 1 or not tensors:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        flat = torch.cat([tensor.reshape(-1) for tensor in group]).to(collective_device())
        dist.all_reduce(flat)
        flat = flat.to(group[0].device) / world
        offset = 0
        for tensor in group:
            tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


@torch.no_grad()
def sum_over_ranks(tensor: Tensor) -> Tensor:
    """``tensor`` summed over the ranks, as a new tensor on ``tensor``'s device (the collective runs on the device
    the process group serves); ``tensor`` itself in a single process."""
    _, world = rank_and_world()
    if world == 1:
        return tensor
    reduced = tensor.to(collective_device(), copy=True)
    dist.all_reduce(reduced)
    return reduced.to(tensor.device)


def max_over_ranks(value: int) -> int:
    """The largest of the ranks' ``value`` (itself in a single process): one small all-reduce."""
    _, world = rank_and_world()
    if world == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and persistent buffers to every rank (no-op in a single process)."""
    _, world = rank_and_world()
    if world == 1:
        return
    for tensor in module.state_dict().values():  # shares storage with the module: broadcast writes in place
        _in_place_on_collective_device(dist.broadcast, tensor, src)


def mean_across_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks (every rank passes the same keys)."""
    _, world = rank_and_world()
    if world == 1 or not values:
        return dict(values)
    keys = list(values)
    device = collective_device()
    tensor = torch.tensor([float(values[key]) for key in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return {key: value / world for key, value in zip(keys, tensor.tolist())}


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    gathered = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered
