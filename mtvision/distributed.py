"""torch.distributed helpers shared by training, probes and losses; every one also works without a process group
(a single process is a world of one)."""
import contextlib
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ['GradientReducer', 'all_gather_objects', 'average_over_ranks', 'average_scalars_over_ranks',
           'broadcast_module', 'collective_device', 'distributed_session', 'gather_shards', 'gather_with_grad',
           'is_main_process', 'max_over_ranks', 'mean_shard_over_ranks', 'rank_and_world', 'setup_distributed',
           'sum_over_ranks', 'sum_with_grad']


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


def _reached_parameters(roots: Iterable[Tensor]) -> set[int]:
    """The ids of the leaf tensors a backward from ``roots`` accumulates gradients into (their autograd graph's
    ``AccumulateGrad`` nodes)."""
    stack = [root.grad_fn for root in roots if root.grad_fn is not None]
    seen, reached = set(), set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, 'variable', None)
        if variable is not None:
            reached.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return reached


class GradientReducer:
    """Averages ``.grad`` over the ranks bucket by bucket while the backward still runs, as DDP's reducer does, for a
    model whose steps use varying subsets of its parameters (tasks absent from a step, parameters no loss reached).

    DistributedDataParallel itself does not fit: a step runs one forward per task, and DDP's per-forward bookkeeping
    expects one forward per backward. Per step, :meth:`prepare` cuts the step's parameters (the same on every rank,
    in the order the backward produces their gradients) into buckets of about ``bucket_cap_mb``. Within
    :meth:`overlap`, the backward of the step's last micro-batch, each parameter's post-accumulate-grad hook marks it
    ready; a parameter the losses of this rank do not reach (their autograd graph says) is ready from the start. A
    bucket whose parameters are all ready is flattened and its all-reduce launched asynchronously, in bucket order, on
    a process group of its own: every rank launches the same collectives in the same order, whatever the timing of
    its backward and whatever the backward itself exchanges on the default group (gathered negatives, global batch
    norm). :meth:`finish` launches what is left, waits, and writes the averages back. A parameter no rank reached
    keeps no gradient (None), as in one process on the global batch (the optimizer skips it); one some ranks reached
    gets the average, with zeros for the others. Parameters whose gradients the aggregator already averaged
    (gradient surgery exchanges its per-task gradients itself) are passed to ``finish`` and not reduced again.

    In a single process every method is a no-op.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], bucket_cap_mb: float = 25.0, overlap: bool = True):
        self.world_size = rank_and_world()[1]
        self.bucket_bytes = max(1, int(bucket_cap_mb * 2 ** 20))
        self.overlap_enabled = overlap
        # the last step's wait for the exchange after its backward, and the bytes exchanged in all and while the
        # backward ran (benchmarks read them)
        self.exposed_seconds = 0.0
        self.bytes_exchanged = self.bytes_during_backward = 0
        self._bucketings: dict[tuple, list[list[torch.nn.Parameter]]] = {}
        self._buckets: list[list[torch.nn.Parameter]] = []
        self._armed = False
        self._pending: dict[int, int] = {}  # bucket -> parameters not ready yet
        self._bucket_of: dict[int, int] = {}  # id(param) -> bucket
        self._launched: list[tuple[list[torch.nn.Parameter], Tensor, list[bool], object]] = []
        self._next_bucket = 0
        if self.world_size == 1:
            self.group = None
            return
        # its own communicator: its collectives are ordered among themselves only
        self.group = dist.new_group(backend=dist.get_backend_config())
        for param in params:
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(self._on_gradient)

    def prepare(self, params: Sequence[torch.nn.Parameter]) -> None:
        """The step's parameters, the same on every rank, in the order the backward produces their gradients (the
        reverse of the forward's)."""
        if self.group is None:
            return
        params = [p for p in params if p.requires_grad]
        key = tuple(id(p) for p in params)
        if key not in self._bucketings:
            self._bucketings[key] = self._cut_into_buckets(params)
        self._buckets = self._bucketings[key]
        self._bucket_of = {id(p): index for index, bucket in enumerate(self._buckets) for p in bucket}
        self._launched, self._next_bucket, self._pending = [], 0, {}
        self.bytes_exchanged = self.bytes_during_backward = 0

    def _cut_into_buckets(self, params: list[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
        buckets, filled = [], 0
        for param in params:
            bytes_ = param.numel() * param.element_size()
            if not buckets or filled + bytes_ > self.bucket_bytes or buckets[-1][0].dtype != param.dtype \
                    or buckets[-1][0].device != param.device:
                buckets.append([])
                filled = 0
            buckets[-1].append(param)
            filled += bytes_
        return buckets

    @contextlib.contextmanager
    def overlap(self, losses: Iterable[Tensor], expected: Iterable[torch.nn.Parameter] = ()) -> Iterator[None]:
        """Exchange buckets as soon as the backward run inside the block has finished them; ``losses`` are the
        tensors the backward starts from: a parameter they do not reach is ready at once, unless it is in
        ``expected`` (learned loss weights, which the aggregator's own terms reach). Wrap only the backward of the
        step's last micro-batch: earlier ones accumulate locally (DDP's ``no_sync``)."""
        if self.group is None or not self.overlap_enabled:
            yield
            return
        reached = _reached_parameters(losses) | {id(p) for p in expected}
        self._pending = {index: sum(id(p) in reached for p in bucket) for index, bucket in enumerate(self._buckets)}
        self._armed = True
        try:
            self._launch_ready()
            yield
        finally:
            self._armed = False

    def _on_gradient(self, param: torch.nn.Parameter) -> None:
        if not self._armed:
            return
        index = self._bucket_of.get(id(param))
        if index is None:
            return
        if index < self._next_bucket:
            raise RuntimeError(f'a gradient of shape {tuple(param.shape)} arrived after its bucket was exchanged: '
                               f'the autograd graph of the losses did not show that it would be reached; set '
                               f'env_cfg.ddp_cfg.overlap=False')
        self._pending[index] -= 1
        self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next_bucket < len(self._buckets) and self._pending.get(self._next_bucket, 1) <= 0:
            self._launch(self._buckets[self._next_bucket])
            self._next_bucket += 1

    def _launch(self, bucket: list[torch.nn.Parameter]) -> None:
        """Start the all-reduce of ``bucket``'s gradients (zeros where None) and of one flag per parameter saying
        whether this rank had its gradient."""
        reference = bucket[0]
        had_gradient = [p.grad is not None for p in bucket]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket]
                         + [torch.tensor(had_gradient, dtype=reference.dtype, device=reference.device)])
        flat = flat.to(collective_device())
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self.bytes_exchanged += flat.numel() * flat.element_size()
        if self._armed:
            self.bytes_during_backward += flat.numel() * flat.element_size()
        self._launched.append((bucket, flat, had_gradient, work))

    @torch.no_grad()
    def finish(self, synchronized: Iterable[torch.nn.Parameter] = ()) -> None:
        """Launch the buckets not yet exchanged (without the ``synchronized`` parameters, the same on every rank),
        wait for every bucket, and write the averages to ``.grad``."""
        if self.group is None:
            return
        start = time.perf_counter()
        skip = {id(p) for p in synchronized}
        for bucket in self._buckets[:self._next_bucket]:
            if any(id(p) in skip for p in bucket):
                raise RuntimeError('a parameter the aggregator averaged itself was also exchanged during the backward')
        for bucket in self._buckets[self._next_bucket:]:
            bucket = [p for p in bucket if id(p) not in skip]
            if bucket:
                self._launch(bucket)
        self._next_bucket = len(self._buckets)
        unsure = []  # parameters this rank did not reach, with their count of ranks that did
        for bucket, flat, had_gradient, work in self._launched:
            work.wait()
            flat = flat.to(bucket[0].device)
            flags = flat[-len(bucket):]
            offset = 0
            for index, (param, had) in enumerate(zip(bucket, had_gradient)):
                # a view of the reduced buffer, laid out as the parameter (fused optimizers require it)
                param.grad = flat[offset:offset + param.numel()].view_as(param).div_(self.world_size)
                offset += param.numel()
                if not had:
                    unsure.append((param, flags[index]))
        self._launched = []
        if unsure:  # one host read, only in steps where this rank left some parameter without a gradient
            for (param, _), ranks in zip(unsure, torch.stack([flag for _, flag in unsure]).tolist()):
                if ranks == 0:
                    param.grad = None
        self.exposed_seconds = time.perf_counter() - start
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
def mean_shard_over_ranks(buckets: Sequence[Tensor]) -> Tensor:
    """This rank's block of columns of the matrix ``G`` [T, N] that ``buckets`` (each [T, ...]) form side by side
    (flattened, in order), averaged over the ranks: [T, ceil(N / world)], zero past N, on the collective device.

    A reduce-scatter: each rank sends and receives (world - 1) / world of ``G``, half the traffic of an all-reduce.
    Gradient surgery then needs only its Gram matrix (the sum over the ranks of each block's ``G_r G_r^T``) and
    ``w^T G`` gathered back (:func:`gather_shards`). In a single process, ``G`` itself.
    """
    rows = [bucket.reshape(bucket.shape[0], -1) for bucket in buckets]
    _, world = rank_and_world()
    if world == 1:
        return torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]
    tasks, columns = rows[0].shape[0], sum(row.shape[1] for row in rows)
    width = -(-columns // world)
    dtypes = {row.dtype for row in rows}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    blocks = torch.zeros(world * tasks * width, dtype=dtype, device=collective_device())
    by_rank = blocks.view(world, tasks, width)
    start = 0  # copy each bucket's columns into the rank blocks they fall in
    for row in rows:
        end = start + row.shape[1]
        for rank in range(start // width, (end - 1) // width + 1):
            lo, hi = max(start, rank * width), min(end, (rank + 1) * width)
            by_rank[rank, :, lo - rank * width:hi - rank * width] = row[:, lo - start:hi - start]
        start = end
    shard = torch.empty(tasks * width, dtype=dtype, device=blocks.device)
    # torch 2.14 renamed reduce_scatter_tensor and all_gather_into_tensor (the old names warn)
    getattr(dist, 'reduce_scatter_single', dist.reduce_scatter_tensor)(shard, blocks)
    return shard.view(tasks, width).div_(world)


@torch.no_grad()
def gather_shards(shard: Tensor, length: int) -> Tensor:
    """Every rank's ``shard`` (the same shape on each) concatenated in rank order and cut to ``length``: the inverse of
    :func:`mean_shard_over_ranks`'s split, on ``shard``'s device; ``shard`` itself in a single process."""
    _, world = rank_and_world()
    if world == 1:
        return shard[:length]
    sent = shard.to(collective_device()).contiguous()
    gathered = torch.empty(world * sent.numel(), dtype=sent.dtype, device=sent.device)
    getattr(dist, 'all_gather_single', dist.all_gather_into_tensor)(gathered, sent)
    return gathered[:length].to(shard.device)


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


def average_scalars_over_ranks(values: Mapping[str, float]) -> dict[str, float]:
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
