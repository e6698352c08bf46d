"""Device-to-host synchronisations per training step of the mtvision Trainer, counted on any device (CPU too).

CPU has no sync debug mode (``torch.cuda.set_sync_debug_mode``), so this counts the Python-level tensor operations
that block the host on a GPU until the device catches up: ``item``, ``tolist``, ``bool()``/``int()``/``float()``/
``__index__`` of a tensor, ``nonzero`` (method and ``torch.nonzero``) and boolean-mask indexing (data-dependent
shapes), ``cpu()``, ``numpy()`` and, on a CPU run, ``.to('cpu')`` and the copies to the device that block the
host (``.to(device)`` or ``copy_`` without ``non_blocking``, ``torch.tensor(data, device=...)``: such a copy waits
for the device's queue, and ``set_sync_debug_mode`` reports it). On a GPU run torch's own sync debug mode counts
too, printed as a second total. Each is patched for the counted steps only
and attributed to the first frame inside mtvision/ or torchvision/ (the innermost frame, when it is elsewhere, is
shown as ``via``). Calls that stay
on the host on a GPU run are listed apart, not counted: DataLoader work (the batch is built on the host) and
torch.optim's reads of its step counters (CPU tensors unless the optimizer is capturable), and reads of tensors
that live on the host in a GPU run too (the targets the trainer's loss normalisers count and check before the
copy to the device). On a GPU run the tensor's device says which those are; on a CPU run, where every tensor is a
CPU tensor, a torch-function mode (HostTensors) tracks them: the DataLoader's batches, tensors made without a
device, copies made with ``.cpu()``/``.to('cpu')``, results computed from such tensors alone, and tensors sharing
storage with one (views, ``as_subclass``). Any other tensor counts as a device tensor, so an unrecognised tensor
never hides a sync.

Configs: the real 4-task recipe (configs/real/supervised-4task_vit-b-p16_...: FCOS, UperNet, depth and
classification heads, one task per step, bf16 autocast) reduced to the quick start's tiny ViT at 64 px and its
synthetic data; the 4-task quick start (all four tasks every step) with the default aggregator (WeightedSum), with
AlignedMTL (parameter-level gradient surgery) and the MoE quick start (8 experts, top-2, no capacity factor);
validation, checkpoints and TensorBoard off. Each runs with logging off inside the counted window
(log_cfg.interval huge) and with logging every step. The steps run through ``Trainer.train``; a step is counted
from one ``start_step`` of the iteration timer to the next, and the last step of each ``train`` call (which always
logs) is left out of the no-logging run. The trainer's non-finite check is one sync per step by design (without a
grad scaler) and a logging step reads its scalars back once.

Host syncs per step without logging (``--steps 6``, CPU, batch 4 per task), committed code before the FCOS loss
at fixed shapes, the MoE buffer sized without reading the routing, Aligned-MTL's coefficients read once and the
host anchor points -> after (steady state; the first step of a task in a ``train`` call adds one-time copies):

    real 4-task recipe (reduced)   11 (detection steps 20) -> 2
    quick start (WeightedSum)      18 -> 2
    quick start + AlignedMTL       103 -> 5
    MoE quick start                30 -> 2

The 2 are the trainer's non-finite check and its blocking copy of the loss normalisers to the device (1 with
``non_blocking=True``); the AlignedMTL 5 become 2 when GradientSurgery reads K to the host once per step.

    python benchmarks/host_syncs.py [--steps 4] [--warmup 2] [--batch-size 4] [--data data/synthetic] [--device cpu]
"""
import argparse
import collections
import contextlib
import statistics
import sys
import tempfile
import threading
import traceback
import warnings
import weakref
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from common import ROOT, run_steps
from mtvision.data.synthetic import ensure_synthetic

QUICKSTART_DIR = ROOT / 'configs' / 'quickstart'
REAL_4TASK = ROOT / 'configs' / 'real' / 'supervised-4task_vit-b-p16_8xb64-100k_in1k-coco-ade20k-nyuv2.py'
# the real recipe at a size the CPU runs: the quick start's tiny ViT at 64 px and its synthetic data in place of
# ViT-B/16 at 224 px and the four datasets; heads (FCOS with 4-conv towers, UperNet, depth, 256-channel pyramid),
# mixer (one task per step), bf16 autocast and optimizer stay the recipe's
TINY_VIT_64PX = dict(model_name='vit_tiny_patch16_224', img_size=64, patch_size=8, embed_dim=128, depth=6,
                     num_heads=4)
CONFIGS = {
    'real 4-task recipe (reduced)': (REAL_4TASK, {f'model.backbone.{key}': value
                                                  for key, value in TINY_VIT_64PX.items()}),
    'quickstart (WeightedSum)': (QUICKSTART_DIR / 'vit-tiny-p8_4task_synthetic.py', {}),
    'quickstart + AlignedMTL': (QUICKSTART_DIR / 'vit-tiny-p8_4task_synthetic.py',
                                {'aggregator': dict(type='AlignedMTL')}),
    'MoE quickstart (e8, top-2)': (QUICKSTART_DIR / 'vit-tiny-p8-moe-e8_4task_synthetic.py', {}),
}
# Tensor methods that read a device tensor back to the host
READ_BACKS = ('item', 'tolist', '__bool__', '__int__', '__float__', '__index__', 'nonzero', 'cpu', 'numpy')
ATTRIBUTED = ('/mtvision/', '/torchvision/')
HOST_SIDE_PATHS = {'/torch/utils/data/': 'DataLoader (host batch)'}
SELF_FILE = str(Path(__file__).resolve())
SYNC_DEBUG_MODE = 'torch.cuda sync debug mode'
DEVICE_GETTER = torch.Tensor.device.__get__


def _is_mask_index(index) -> bool:
    """Whether ``tensor[index]`` has a data-dependent shape: a boolean (or uint8) tensor index."""
    indices = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


class HostTensors(TorchFunctionMode):
    """On a CPU run, which tensors would live on the host in a GPU run: the DataLoader's batches (built on the host,
    some from NumPy arrays, which no torch function sees), tensors made without a ``device`` (or with the literal
    ``'cpu'``), the results of ``.cpu()`` and ``.to('cpu')``, the results of ops whose tensor inputs are all such
    host tensors, and any tensor sharing its storage with a live host tensor (a view, or an ``as_subclass`` such
    as torchvision's ``BoundingBoxes``, which bypasses torch functions). Everything else counts as a device tensor,
    so a tensor this tracker does not recognise is never taken for a host one. A move to a device
    (``.to(device_object)``), which on the CPU returns the tensor itself, returns a copy here, as on a GPU, so the
    DataLoader's host batch and the model's copy stay apart."""

    def __init__(self):
        super().__init__()
        self._refs: dict[int, weakref.ref] = {}  # by id: a WeakSet would compare tensors with ==
        # storage address -> weak references to the host tensors on it; a live one keeps the address from reuse
        self._storages: dict[int, list[weakref.ref]] = collections.defaultdict(list)
        self.on_copy_to_host = None  # called with the tensor of each .to('cpu') of a device tensor (a read-back)
        self.on_blocking_copy_to_device = None  # called with the source of each blocking copy to the device
        # the torch.device objects read from host tensors (``boxes.device``): on a GPU run they name the CPU
        self._host_devices: dict[int, torch.device] = {}

    def __contains__(self, tensor) -> bool:
        ref = self._refs.get(id(tensor))
        if ref is not None and ref() is tensor:
            return True
        address = _storage_address(tensor)
        return bool(address) and any(ref() is not None for ref in self._storages.get(address, ()))

    def _mark(self, tensor: torch.Tensor, host: bool) -> None:
        key = id(tensor)
        ref = self._refs.get(key)
        if not host:
            self._refs.pop(key, None)
        elif ref is None or ref() is not tensor:
            self._refs[key] = weakref.ref(tensor, lambda ref: self._refs.pop(key) if self._refs.get(key) is ref
                                          else None)
            address = _storage_address(tensor)
            if address:
                refs = self._storages[address]
                refs[:] = [r for r in refs if r() is not None]
                refs.append(weakref.ref(tensor))

    def mark_host(self, values) -> None:
        """Marks every tensor in ``values`` (nested lists, tuples and dicts) as a host tensor."""
        for value in tree_flatten(values)[0]:
            if isinstance(value, torch.Tensor):
                self._mark(value, True)

    @contextlib.contextmanager
    def marking_loader_batches(self):
        """Within the block, every batch a DataLoader iterator returns is marked as host tensors."""
        base = torch.utils.data.dataloader._BaseDataLoaderIter
        next_batch = base.__next__

        def marked_next(iterator):
            batch = next_batch(iterator)
            self.mark_host(batch)
            return batch

        base.__next__ = marked_next
        try:
            yield
        finally:
            base.__next__ = next_batch

    def _move_target(self, args: tuple, kwargs: dict):
        """The device of a ``Tensor.to`` call or a factory's ``device``: ``'cpu'`` (the literal, or the device object
        of a host tensor), ``'device'`` (any other device object: the trainer's, or a device tensor's, which name
        the GPU on a GPU run), or None (a dtype change only, or no device given)."""
        for value in (*args, kwargs.get('device')):
            if isinstance(value, str):
                return value
            if isinstance(value, torch.device):
                return 'cpu' if self._host_devices.get(id(value)) is value else 'device'
        return None

    def _blocking_copy_to_device(self, func, args: tuple, kwargs: dict):
        """The host source of a copy to the device that blocks the host (what ``set_sync_debug_mode`` reports: the
        copy waits for the device's queue): ``.to(device)`` without ``non_blocking``, ``copy_`` from a host tensor
        into a device tensor, or a tensor built from Python data on the device. None for any other call."""
        if kwargs.get('non_blocking') or any(value is True for value in args[2:]):
            return None
        if func is torch.Tensor.to:
            return args[0] if self._move_target(args[1:], kwargs) == 'device' and args[0] in self else None
        if func is torch.Tensor.copy_:
            return args[1] if args[0] not in self and isinstance(args[1], torch.Tensor) and args[1] in self else None
        if func in (torch.tensor, torch.as_tensor) and self._move_target((), kwargs) == 'device':
            return args[0]
        if func is torch.Tensor.new_tensor and args[0] not in self:
            return args[1]
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        source = self._blocking_copy_to_device(func, args, kwargs)
        if source is not None and self.on_blocking_copy_to_device is not None:
            self.on_blocking_copy_to_device(source)
        result = func(*args, **kwargs)
        if func == DEVICE_GETTER:  # ``tensor.device``: a host tensor's device object names the host
            if args[0] in self:
                self._host_devices[id(result)] = result  # kept alive, so the id is not reused
            return result
        inputs = [value for value in tree_flatten((args, kwargs))[0] if isinstance(value, torch.Tensor)]
        if func is torch.Tensor.cpu:
            host = True
        elif func is torch.Tensor.to and self._move_target(args[1:], kwargs) is not None:
            host = self._move_target(args[1:], kwargs) == 'cpu'
            if host and args[0] not in self and self.on_copy_to_host is not None:
                self.on_copy_to_host(args[0])
        elif inputs:
            host = all(value in self for value in inputs)
        else:  # a factory: torch's default device is the CPU
            host = self._move_target((), kwargs) in (None, 'cpu')
        if func in (torch.Tensor.cpu, torch.Tensor.to) and result is args[0]:
            result = result.clone()  # a move copies on a GPU
        for value in tree_flatten(result)[0]:
            if isinstance(value, torch.Tensor):
                self._mark(value, host)
        return result


def _storage_address(tensor: torch.Tensor) -> int:
    """The address of the tensor's storage (0 for an empty one, or a tensor without storage)."""
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


class SyncCounter:
    """Patches the read-back operations while active and records, per step, each call's site.

    ``step_counters`` returns the ids of the optimizer's step counters; ``on_host`` tells whether a tensor lives
    on the host on a GPU run. Calls on either, and calls made inside the DataLoader, are recorded as host-side,
    not as syncs.
    """

    def __init__(self, step_counters, on_host):
        self.step_counters = step_counters
        self.on_host = on_host
        self.steps: list[collections.Counter] = []  # per step: (kind, operation, site, via) -> calls
        self._local = threading.local()

    def new_step(self) -> None:
        self.steps.append(collections.Counter())

    def _record(self, operation: str, tensor) -> None:
        if not self.steps:  # before the first counted step (loader and bar set-up)
            return
        stack = [frame for frame in traceback.extract_stack() if frame.filename != SELF_FILE]
        files = [frame.filename.replace('\\', '/') for frame in stack]
        site = next((f for f, path in zip(reversed(stack), reversed(files)) if any(p in path for p in ATTRIBUTED)),
                    stack[-1])
        innermost = stack[-1]
        via = '' if innermost is site else f'{_short(innermost.filename)}:{innermost.lineno}'
        kind = 'sync'
        for path, reason in HOST_SIDE_PATHS.items():
            if any(path in f for f in files):
                kind = reason
        if kind == 'sync' and isinstance(tensor, torch.Tensor):
            if id(tensor) in self.step_counters():
                kind = 'optimizer step counter (host)'
            elif self.on_host(tensor):
                kind = 'host tensor'
        self.steps[-1][kind, operation, f'{_short(site.filename)}:{site.lineno}', via] += 1

    def _wrap(self, operation: str, original, condition=None):
        counter = self

        def patched(*args, **kwargs):
            # only the outermost read-back counts (tolist inside a patched call is one sync, not two)
            if getattr(counter._local, 'busy', False) or (condition is not None and not condition(*args)):
                return original(*args, **kwargs)
            counter._local.busy = True
            try:
                counter._record(operation, args[0] if args else None)
                return original(*args, **kwargs)
            finally:
                counter._local.busy = False
        return patched

    @contextlib.contextmanager
    def patched(self):
        originals = {}
        patches = {name: self._wrap(name, getattr(torch.Tensor, name)) for name in READ_BACKS}
        patches['__getitem__'] = self._wrap('bool-mask index', torch.Tensor.__getitem__,
                                            condition=lambda tensor, index: _is_mask_index(index))
        for name, patch in patches.items():
            originals[name] = torch.Tensor.__dict__.get(name)
            setattr(torch.Tensor, name, patch)
        torch_nonzero = torch.nonzero
        torch.nonzero = self._wrap('torch.nonzero', torch_nonzero)
        try:
            yield self
        finally:
            torch.nonzero = torch_nonzero
            for name, original in originals.items():
                if original is None:  # inherited from the C base class: remove the override
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, original)


def _short(filename: str) -> str:
    path = filename.replace('\\', '/')
    for marker in ('/mtvision/', '/torchvision/', '/torch/', '/timm/', '/benchmarks/'):
        if marker in path:
            return marker.strip('/') + '/' + path.split(marker, 1)[1]
    return path


def build_trainer(config: Path, overrides: dict, work_dir: Path, data: Path, batch_size: int, device: str,
                  log_interval: int):
    from mtvision.config import load_config
    from mtvision.engine import Trainer

    cfg = load_config(str(config), {'log_cfg.tensorboard': False, 'log_cfg.visualize': False,
                                    'log_cfg.interval': log_interval, 'checkpoint_cfg.interval': 10 ** 9,
                                    'checkpoint_cfg.save_last': False, 'env_cfg.device': device, **overrides})
    tasks = cfg.to_dict()['tasks']
    if config.parent != QUICKSTART_DIR:  # a real recipe: the quick start's synthetic data and class counts
        synthetic = load_config(str(QUICKSTART_DIR / 'vit-tiny-p8_4task_synthetic.py')).to_dict()['tasks']
        for name, task in tasks.items():
            task['train_dataset'] = synthetic[name]['train_dataset']
            for key in ('num_classes', 'max_depth'):
                if key in task['head']:
                    task['head'][key] = synthetic[name]['head'].get(key, task['head'][key])
    for task in tasks.values():
        task['batch_size'] = batch_size
        task['num_workers'] = 0  # the DataLoader's host work stays in this process, where the patches see it
        dataset = task['train_dataset']
        for key in ('data_root', 'img_dir', 'ann_file', 'ann_dir', 'depth_dir'):
            if key in dataset and dataset[key].startswith('data/synthetic'):
                dataset[key] = str(data) + dataset[key][len('data/synthetic'):]
    cfg.tasks = tasks
    return Trainer(cfg, work_dir, validate=False)


def count_syncs(config: Path, overrides: dict, data: Path, args, log_interval: int) -> list[collections.Counter]:
    """Per counted step, the read-back calls by (kind, operation, site, via)."""
    with tempfile.TemporaryDirectory() as work_dir:
        trainer = build_trainer(config, overrides, Path(work_dir), data, args.batch_size, args.device, log_interval)
        run_steps(trainer, args.warmup)  # optimizer state exists, first-call set-up done

        def step_counters() -> set[int]:
            return {id(state['step']) for state in trainer.optimizer.state.values()
                    if isinstance(state.get('step'), torch.Tensor) and not state['step'].is_cuda}

        # on a GPU the device says where a tensor is; on the CPU the tracker works it out
        host_tensors = HostTensors() if trainer.device.type == 'cpu' else contextlib.nullcontext()
        on_host = host_tensors.__contains__ if trainer.device.type == 'cpu' else (
            lambda tensor: tensor.device.type == 'cpu')
        counter = SyncCounter(step_counters, on_host)
        if trainer.device.type == 'cpu':
            host_tensors.on_copy_to_host = lambda tensor: counter._record("to('cpu')", tensor)
            host_tensors.on_blocking_copy_to_device = lambda source: counter._record('blocking copy to device', None)
        start_step = trainer.timer.start_step

        def counted_start_step() -> None:
            counter.new_step()
            start_step()

        trainer.timer.start_step = counted_start_step  # the instance only: the trainer's code is unchanged
        loader_batches = host_tensors.marking_loader_batches() if trainer.device.type == 'cpu' else (
            contextlib.nullcontext())
        debug_mode = _sync_debug_warnings(counter) if trainer.device.type == 'cuda' else contextlib.nullcontext()
        with counter.patched(), host_tensors, loader_batches, debug_mode:
            run_steps(trainer, args.steps)
        return counter.steps


@contextlib.contextmanager
def _sync_debug_warnings(counter: SyncCounter):
    """On a GPU run, torch's own count besides the patched calls: ``set_sync_debug_mode('warn')`` warns at every
    synchronising CUDA call (blocking copies included); each warning is added to the current step under its own
    kind, reported as a second total (the patched reads warn too, so the two totals overlap)."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():  # restores warnings.showwarning on exit
        warnings.simplefilter('always')
        show = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None):
            if 'synchroniz' in str(message) and counter.steps:
                counter.steps[-1][SYNC_DEBUG_MODE, 'cuda sync', f'{_short(filename)}:{lineno}', ''] += 1
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode('warn')
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)


def report(name: str, steps: list[collections.Counter], top: int) -> float:
    syncs_per_step = [sum(n for key, n in step.items() if key[0] == 'sync') for step in steps]
    per_step = statistics.median(syncs_per_step)
    total = collections.Counter()
    for step in steps:
        total.update(step)
    print(f'\n== {name}: host syncs per step: {per_step:g} (per counted step: {syncs_per_step})')
    debug_per_step = [sum(n for key, n in step.items() if key[0] == SYNC_DEBUG_MODE) for step in steps]
    if any(debug_per_step):
        print(f'   torch.cuda sync debug mode warnings per step: {statistics.median(debug_per_step):g} '
              f'(per counted step: {debug_per_step})')
    print(f'{"calls/step":>10}  {"operation":<16} {"site":<44} {"via / kind"}')
    ranked = sorted(total.items(), key=lambda item: (item[0][0] != 'sync', -item[1]))
    for (kind, operation, site, via), calls in ranked[:top]:
        note = via if kind == 'sync' else f'[{kind}, not counted]' + (f' via {via}' if via else '')
        print(f'{calls / len(steps):>10.2f}  {operation:<16} {site:<44} {note}')
    if len(ranked) > top:
        print(f'{"":>10}  ... {len(ranked) - top} more sites')
    return per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--steps', type=int, default=4, help='counted steps per run')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--batch-size', type=int, default=4, help='per task')
    parser.add_argument('--data', default=str(ROOT / 'data' / 'synthetic'))
    parser.add_argument('--device', default='cpu', help='the trainer device (cpu, cuda)')
    parser.add_argument('--top', type=int, default=12, help='call sites shown per run')
    parser.add_argument('--configs', nargs='+', default=list(CONFIGS), choices=list(CONFIGS), metavar='NAME',
                        help=f'runs to count, of: {", ".join(CONFIGS)}')
    args = parser.parse_args()
    if args.steps < 2:
        parser.error('--steps must be at least 2: the last step of a run always logs')
    data = Path(args.data)
    ensure_synthetic(data)
    results = {}
    for name in args.configs:
        config, overrides = CONFIGS[name]
        for logging, interval in (('no logging', 10 ** 9), ('logging every step', 1)):
            # the no-logging run steps one further: its last step logs (train() logs at max_iters) and is dropped
            steps = count_syncs(config, overrides, data, argparse.Namespace(
                **{**vars(args), 'steps': args.steps + (interval > 1)}), interval)
            if interval > 1:
                steps = steps[:-1]
            results[f'{name}, {logging}'] = report(f'{name}, {logging}', steps, args.top)
    print(f'\n{"run":<50} {"host syncs/step":>16}')
    for name, value in results.items():
        print(f'{name:<50} {value:>16g}')
    print('\nsummary: host syncs per step, ' + '; '.join(f'{name} {value:g}' for name, value in results.items())
          + f' ({args.device}, batch {args.batch_size} per task, {args.steps} counted steps, torch '
          f'{torch.__version__}, {torch.get_num_threads()} threads)')


if __name__ == '__main__':
    sys.exit(main())
