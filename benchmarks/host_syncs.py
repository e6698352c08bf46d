"""Device-to-host synchronisations per training step of the mtvision Trainer, counted on any device (CPU too).

CPU has no sync debug mode (``torch.cuda.set_sync_debug_mode``), so this counts the Python-level tensor operations
that block the host on a GPU until the device catches up: ``item``, ``tolist``, ``bool()``/``int()``/``float()``/
``__index__`` of a tensor, ``nonzero`` (method and ``torch.nonzero``) and boolean-mask indexing (data-dependent
shapes), ``cpu()``, ``numpy()`` and (on a CPU run) ``.to('cpu')``. Each is patched for the counted steps only
and attributed to the first frame inside mtvision/ or torchvision/ (the innermost frame, when it is elsewhere, is
shown as ``via``). Calls that stay
on the host on a GPU run are listed apart, not counted: DataLoader work (the batch is built on the host) and
torch.optim's reads of its step counters (CPU tensors unless the optimizer is capturable), and reads of tensors
that live on the host in a GPU run too. On a GPU run the tensor's device says which those are; on a CPU run, where
every tensor is a CPU tensor, a torch-function mode (HostTensors) tracks them: made without a device, copied with
``.cpu()``/``.to('cpu')``, or computed from such tensors alone.

Configs: the 4-task quick start with the default aggregator (WeightedSum), with AlignedMTL (parameter-level
gradient surgery) and the MoE quick start; validation, checkpoints and TensorBoard off. Each runs with logging off
inside the counted window (log_cfg.interval huge) and with logging every step. The steps run through
``Trainer.train``; a step is counted from one ``start_step`` of the iteration timer to the next, and the last step
of each ``train`` call (which always logs) is left out of the no-logging run.

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
import weakref
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from common import ROOT, run_steps
from mtvision.data.synthetic import ensure_synthetic

QUICKSTART_DIR = ROOT / 'configs' / 'quickstart'
CONFIGS = {
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


def _is_mask_index(index) -> bool:
    """Whether ``tensor[index]`` has a data-dependent shape: a boolean (or uint8) tensor index."""
    indices = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


class HostTensors(TorchFunctionMode):
    """On a CPU run, which tensors would live on the host in a GPU run: tensors made without a ``device`` (or with
    the literal ``'cpu'``), the results of ``.cpu()`` and ``.to('cpu')``, and the results of ops whose tensor inputs
    are all such host tensors. A move to a device (``.to(device_object)``), which on the CPU returns the tensor
    itself, returns a copy here, as on a GPU, so the DataLoader's host batch and the model's copy stay apart."""

    def __init__(self):
        super().__init__()
        self._refs: dict[int, weakref.ref] = {}  # by id: a WeakSet would compare tensors with ==
        self.on_copy_to_host = None  # called with the tensor of each .to('cpu') of a device tensor (a read-back)

    def __contains__(self, tensor) -> bool:
        ref = self._refs.get(id(tensor))
        return ref is not None and ref() is tensor

    def _mark(self, tensor: torch.Tensor, host: bool) -> None:
        key = id(tensor)
        if not host:
            self._refs.pop(key, None)
        elif tensor not in self:
            self._refs[key] = weakref.ref(tensor, lambda ref: self._refs.pop(key) if self._refs.get(key) is ref
                                          else None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        inputs = [value for value in tree_flatten((args, kwargs))[0] if isinstance(value, torch.Tensor)]
        if func is torch.Tensor.cpu:
            host = True
        elif func is torch.Tensor.to and _move_target(args[1:], kwargs) is not None:
            host = _move_target(args[1:], kwargs) == 'cpu'
            if host and args[0] not in self and self.on_copy_to_host is not None:
                self.on_copy_to_host(args[0])
        elif inputs:
            host = all(value in self for value in inputs)
        else:  # a factory: torch's default device is the CPU
            host = kwargs.get('device') in (None, 'cpu')
        if func in (torch.Tensor.cpu, torch.Tensor.to) and result is args[0]:
            result = result.clone()  # a move copies on a GPU
        for value in tree_flatten(result)[0]:
            if isinstance(value, torch.Tensor):
                self._mark(value, host)
        return result


def _move_target(args: tuple, kwargs: dict):
    """The device of a ``Tensor.to`` call: ``'cpu'`` (literal), another device, or None (a dtype change only)."""
    for value in (*args, kwargs.get('device')):
        if isinstance(value, str):
            return value
        if isinstance(value, torch.device):
            return 'device'  # the trainer's device object, or another tensor's: the model's device on a GPU run
    return None


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
        start_step = trainer.timer.start_step

        def counted_start_step() -> None:
            counter.new_step()
            start_step()

        trainer.timer.start_step = counted_start_step  # the instance only: the trainer's code is unchanged
        with counter.patched(), host_tensors:
            run_steps(trainer, args.steps)
        return counter.steps


def report(name: str, steps: list[collections.Counter], top: int) -> float:
    syncs_per_step = [sum(n for key, n in step.items() if key[0] == 'sync') for step in steps]
    per_step = statistics.median(syncs_per_step)
    total = collections.Counter()
    for step in steps:
        total.update(step)
    print(f'\n== {name}: host syncs per step: {per_step:g} (per counted step: {syncs_per_step})')
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
    args = parser.parse_args()
    if args.steps < 2:
        parser.error('--steps must be at least 2: the last step of a run always logs')
    data = Path(args.data)
    ensure_synthetic(data)
    results = {}
    for name, (config, overrides) in CONFIGS.items():
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
