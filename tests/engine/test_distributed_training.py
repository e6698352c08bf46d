"""Data-parallel training with 2 gloo processes against one process on the same global batch."""
import contextlib
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mmengine.config import Config
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from mtvision.engine import Trainer

from mtvision.checkpoint import read_weights
from mtvision.engine.logging import latest_run_dir

WORLD_SIZE = 2
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def process_group(rank: int, port: int, backend: str = 'gloo'):
    """This rank in a WORLD_SIZE group for the block. On success the ranks meet at a barrier before tearing the group
    down: a rank that destroys it while its peer still has collectives in flight can abort (std::terminate)."""
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=WORLD_SIZE)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def two_classification_tasks(tiny_config, batch_size: int, options: dict) -> Config:
    """Two heads on the classification data, the deterministic validation pipeline for training, so both runs see
    identical inputs."""
    cfg = tiny_config(**{'train_cfg.max_iters': 4, 'train_cfg.val_interval': 4, 'checkpoint_cfg.interval': 4,
                         **options})
    cls = cfg.tasks['cls']
    cls['train_dataset']['pipeline'] = cls['val_dataset']['pipeline']
    cls['batch_size'] = batch_size
    cfg.tasks = {'cls': cls, 'cls_avg': dict(cls, head=dict(cls['head'], feature='avg'))}
    return cfg


def train_on_rank(rank: int, port: int, cfg_dict: dict, work_dir) -> None:
    with process_group(rank, port):
        trainer = Trainer(Config(cfg_dict), work_dir)
        results = trainer.train()
        torch.save(dict(weights=trainer.model.state_dict(), results=results), work_dir / f'rank{rank}.pt')


# one head drawn per step (round robin) leaves the other unused: no hang, and no update of it on either side;
# PCGrad with both tasks every step: the surgery of the rank-averaged per-task gradients, with shared task orders
# Aligned-MTL-UB: the feature-level Gram matrices are averaged over the ranks
@pytest.mark.parametrize('options', [{'mixer.strategy': 'round_robin', 'mixer.tasks_per_step': 1},
                                     {'mixer.strategy': 'all', 'aggregator': dict(type='PCGrad', seed=1)},
                                     {'mixer.strategy': 'all', 'aggregator': dict(type='AlignedMTLUB')}],
                         ids=['weighted-sum-round-robin', 'pcgrad', 'aligned-mtl-ub'])
def test_two_processes_train_like_one_on_the_global_batch(tiny_config, tmp_path, options):
    single = Trainer(two_classification_tasks(tiny_config, batch_size=4, options=options), tmp_path / 'single')
    single_results = single.train()

    cfg = two_classification_tasks(tiny_config, batch_size=2, options=options)
    mp.spawn(train_on_rank, args=(free_port(), cfg.to_dict(), tmp_path / 'ddp'), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / 'ddp' / f'rank{rank}.pt', weights_only=True) for rank in range(WORLD_SIZE)]

    for key, value in ranks[0]['weights'].items():  # the ranks never drift apart
        assert torch.equal(value, ranks[1]['weights'][key]), key
    written = read_weights(tmp_path / 'ddp')  # rank 0 wrote the checkpoint
    expected = single.model.state_dict()
    assert written.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(written[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
    # validation is sharded over the ranks and merged: the same numbers as one process on the whole set
    for rank in ranks:
        for task in ('cls', 'cls_avg'):
            assert rank['results'][task]['top1'] == pytest.approx(single_results[task]['top1'])
    # one writer: the scalars file has the single run's lines, not one set per rank
    lines = [(latest_run_dir(tmp_path / run) / 'scalars.jsonl').read_text().count('\n') for run in ('single', 'ddp')]
    assert lines[0] == lines[1] > 0


# every aggregator; surgery at the parameter level (PCGrad, Aligned-MTL) and at the feature level (Aligned-MTL-UB).
# Aligned-MTL scales by the median eigenvalue here: on these tasks its default, the smallest eigenvalue kept by the
# rank cut, turns rounding into 6e-5 within one process already (Gram matrix in 1 chunk or 2); the median, 2e-7
AGGREGATORS = {'weighted-sum': dict(type='WeightedSum'), 'uncertainty': dict(type='UncertaintyWeighting'),
               'gradnorm': dict(type='GradNorm'), 'pcgrad': dict(type='PCGrad', seed=1),
               'aligned-mtl': dict(type='AlignedMTL', scale_mode='median'), 'aligned-mtl-ub': dict(type='AlignedMTLUB')}


def supervised_and_contrastive(tiny_config, batch_size: int, aggregator: dict, contrastive: bool = True,
                               **options) -> Config:
    """The quick start's classification, detection, segmentation and depth tasks and a contrastive one, all in every
    step, trained without random augmentation for 10 iterations. (MAE is left out: its masks are drawn per rank.)

    SGD with momentum, whose update is linear in the gradient: Adam divides each gradient element by its running
    magnitude, which turns float32 rounding differences of near-zero elements into differences of up to the learning
    rate (one process with 1 thread against 2 threads already differs by 3e-5 after 10 AdamW steps)."""
    cfg = tiny_config(**{'train_cfg.max_iters': 10, 'checkpoint_cfg.interval': 10, 'mixer.strategy': 'all',
                         'aggregator': aggregator, 'param_scheduler': [],
                         'optim_wrapper.optimizer': dict(_delete_=True, type='SGD', lr=0.02, momentum=0.9),
                         **options})
    for task in cfg.tasks.values():
        task['train_dataset']['pipeline'] = task['val_dataset']['pipeline']
    if contrastive:  # SimCLR on two identical views (negatives gathered from every rank)
        cfg.tasks['contrastive'] = dict(
            type='contrastive', head=dict(type='SimCLRHead', hidden_dim=32, out_dim=16, temperature=0.2),
            train_dataset=dict(type='UnlabeledImageFolder', data_root=cfg.tasks['cls']['train_dataset']['data_root'],
                               pipeline=[dict(type='MultiView', pipeline=cfg.tasks['cls']['val_dataset']['pipeline'])]))
    for task in cfg.tasks.values():
        task['batch_size'] = batch_size
    return cfg


def train_each_on_rank(rank: int, port: int, cfg_dicts: dict, work_dir) -> None:
    with process_group(rank, port):
        for name, cfg_dict in cfg_dicts.items():
            Trainer(Config(cfg_dict), work_dir / name, validate=False).train()


def max_differences(weights: dict, trainer: Trainer) -> tuple[float, float]:
    """The largest absolute difference of ``weights`` from ``trainer``'s parameters, and from its buffers."""
    expected = trainer.model.state_dict()
    assert weights.keys() == expected.keys()
    parameters = {name for name, _ in trainer.model.named_parameters()}
    differences = {key: float((weights[key].double() - expected[key].double()).abs().max()) for key in expected}
    return (max(value for key, value in differences.items() if key in parameters),
            max((value for key, value in differences.items() if key not in parameters), default=0.0))


def test_every_task_type_and_aggregator_trains_on_two_processes_like_one(tiny_config, tmp_path):
    """Losses averaged over data-dependent counts (valid pixels, positive points, images with depth) divide by the
    count over all ranks, so the step of 2 processes on batches of 2 is the step of 1 process on the batch of 4.
    (With each rank's own count, as before, the weights differed by 2e-4 after these 10 steps; they move by 2e-2.)"""
    cfgs = {name: supervised_and_contrastive(tiny_config, 2, aggregator).to_dict()
            for name, aggregator in AGGREGATORS.items()}
    mp.spawn(train_each_on_rank, args=(free_port(), cfgs, tmp_path / 'ddp'), nprocs=WORLD_SIZE, join=True)
    differences = {}
    for name, aggregator in AGGREGATORS.items():
        single = Trainer(supervised_and_contrastive(tiny_config, 4, aggregator), tmp_path / 'single' / name,
                         validate=False)
        single.train()
        differences[name] = max_differences(read_weights(tmp_path / 'ddp' / name), single)
    # the trained weights; the projector's BatchNorm statistics (global over the ranks) are float32 means of
    # near-duplicate views, which keep less precision
    assert max(parameters for parameters, _ in differences.values()) <= 1e-5, differences
    assert max(buffers for _, buffers in differences.values()) <= 1e-4, differences


def dino_config(tiny_config, batch_size: int, centering: str) -> Config:
    """The DINO recipe on crops drawn without randomness (the classification task's evaluation resize for the two
    global crops, a plain resize to 32 px for two local crops), iBOT off (its masks are drawn per rank), SGD."""
    cfg = tiny_config(ROOT / 'configs' / 'dino' / 'dino_vit-tiny-p8_600it_synthetic.py', **{
        'train_cfg.max_iters': 4, 'checkpoint_cfg.interval': 4, 'param_scheduler': [],
        'optim_wrapper.optimizer': dict(_delete_=True, type='SGD', lr=0.05, momentum=0.9)})
    evaluation = tiny_config().tasks['cls']['val_dataset']['pipeline']
    dino = cfg.tasks['dino']
    dino['head'] = dict(dino['head'], ibot=None, centering=centering, freeze_last_layer_iters=0)
    dino['train_dataset']['pipeline'] = [dict(type='MultiCrop', global_pipeline=evaluation, num_local_crops=2,
                                              local_pipeline=[dict(type='Resize', size=32), *evaluation[-2:]])]
    dino['batch_size'] = batch_size
    return cfg


@pytest.mark.parametrize('centering', ['center', 'sinkhorn_knopp'])
def test_dino_trains_on_two_processes_like_one(tiny_config, tmp_path, centering):
    """The teacher's centre (a mean over every rank's rows) and Sinkhorn-Knopp's sums cover the global batch, so the
    student, the teacher and the centre of 2 processes on batches of 2 are those of 1 process on the batch of 4."""
    cfgs = {'dino': dino_config(tiny_config, 2, centering).to_dict()}
    mp.spawn(train_each_on_rank, args=(free_port(), cfgs, tmp_path / 'ddp'), nprocs=WORLD_SIZE, join=True)
    single = Trainer(dino_config(tiny_config, 4, centering), tmp_path / 'single', validate=False)
    single.train()
    weights = read_weights(tmp_path / 'ddp' / 'dino')
    parameters, buffers = max_differences(weights, single)
    assert parameters <= 1e-5 and buffers <= 1e-5, (parameters, buffers)
    # the student moved away from its teacher by more than ten times the tolerance; the centre moved when it is used
    moved = weights['heads.dino.student.prototypes'] - weights['heads.dino.teacher.prototypes']
    assert float(moved.abs().max()) > 1e-4
    assert (weights['heads.dino.center'].abs().max() > 1e-3) == (centering == 'center')


@pytest.mark.parametrize('aggregator', ['weighted-sum', 'uncertainty'])
def test_accumulated_micro_batches_train_like_one_batch(tiny_config, tmp_path, aggregator):
    """The normalisers count over the step's micro-batches: 2 accumulated batches of 2 = 1 batch of 4."""
    # contrastive losses are left out: a micro-batch's negatives are its own (as with DDP without a gather)
    whole = Trainer(supervised_and_contrastive(tiny_config, 4, AGGREGATORS[aggregator], contrastive=False),
                    tmp_path / 'whole', validate=False)
    whole.train()
    accumulated = Trainer(supervised_and_contrastive(tiny_config, 2, AGGREGATORS[aggregator], contrastive=False,
                                                     **{'train_cfg.accumulate_steps': 2}),
                          tmp_path / 'accumulated', validate=False)
    accumulated.train()
    assert max(max_differences(accumulated.model.state_dict(), whole)) <= 1e-5


def train_sharded_on_rank(rank: int, port: int, cfg_dict: dict, work_dir, resume_from) -> None:
    with process_group(rank, port):
        trainer = Trainer(Config(cfg_dict), work_dir, resume=resume_from, validate=False)
        # every parameter is sharded: each rank holds half of it
        weight = trainer.model.backbone.model.blocks[0].mlp.fc1.weight
        assert isinstance(weight, DTensor) and weight.to_local().shape[0] == weight.shape[0] // WORLD_SIZE
        trainer.train()


def test_fsdp_over_two_processes_trains_like_one_and_resumes_exactly(tiny_config, tmp_path):
    options = {'mixer.strategy': 'round_robin', 'mixer.tasks_per_step': 1, 'checkpoint_cfg.interval': 2,
               'checkpoint_cfg.max_keep': 5}
    single = Trainer(two_classification_tasks(tiny_config, batch_size=4, options=options), tmp_path / 'single',
                     validate=False)
    single.train()
    cfg = two_classification_tasks(tiny_config, batch_size=2, options={**options, 'env_cfg.fsdp': True})
    for work_dir, resume_from in ((tmp_path / 'fsdp', None), (tmp_path / 'resumed', str(tmp_path / 'fsdp' / 'iter_2'))):
        mp.spawn(train_sharded_on_rank, args=(free_port(), cfg.to_dict(), work_dir, resume_from), nprocs=WORLD_SIZE,
                 join=True)
    # each rank wrote the shards it holds, no file holds the whole model; read back, the shards make the weights
    # that an unsharded model of one process loads
    checkpoint = tmp_path / 'fsdp' / 'iter_4'
    assert sorted(path.name for path in checkpoint.iterdir()) == [
        'model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors',
        'optimizer-00001-of-00002.safetensors', 'optimizer-00002-of-00002.safetensors', 'training_state.pth']
    fc1 = 'backbone.model.blocks.0.mlp.fc1.weight'
    assert [load_file(checkpoint / f'model-0000{i}-of-00002.safetensors')[fc1].shape[0] for i in (1, 2)] == \
        [single.model.state_dict()[fc1].shape[0] // 2] * 2
    sharded, expected = read_weights(tmp_path / 'fsdp'), single.model.state_dict()
    assert sharded.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(sharded[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
    resumed = read_weights(tmp_path / 'resumed')
    assert all(torch.equal(resumed[key], sharded[key]) for key in sharded)


def test_fsdp_refuses_what_it_does_not_support(tiny_config, tmp_path):
    with pytest.raises(ValueError, match='launch several with torchrun'):
        Trainer(tiny_config(**{'env_cfg.fsdp': True}), tmp_path)


COLLECTIVES = ('all_reduce', 'all_gather', 'broadcast', 'all_gather_into_tensor', 'reduce_scatter_tensor',
               'all_gather_single', 'reduce_scatter_single')


def spy_on_collectives(record) -> Callable[[], None]:
    """Wrap torch.distributed's tensor collectives so that each first calls ``record(name, tensors it is handed)``;
    returns what undoes the wrapping."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}  # names vary by version
    for name, original in originals.items():
        def spy(*args, _original=original, _name=name, **kwargs):
            record(_name, [t for arg in args for t in (arg if isinstance(arg, (list, tuple)) else [arg])
                           if isinstance(t, torch.Tensor)])
            return _original(*args, **kwargs)
        setattr(dist, name, spy)
    return lambda: [setattr(dist, name, original) for name, original in originals.items()]


def train_and_record_on_rank(rank: int, port: int, backend: str, cfg_dicts: dict, work_dir) -> None:
    from mtvision.distributed import collective_device

    with process_group(rank, port, backend):
        seen = []
        spy_on_collectives(lambda op, tensors: seen.extend((op, t.device) for t in tensors))
        for name, cfg_dict in cfg_dicts.items():
            Trainer(Config(cfg_dict), work_dir / name).train()
        wrong = sorted({(op, str(device)) for op, device in seen if device != collective_device()})
        torch.save(dict(wrong=wrong, count=len(seen), device=str(collective_device())),
                   work_dir / f'collectives{rank}.pt')


@pytest.mark.parametrize('backend', ['gloo', pytest.param('cuda:gloo', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='a process group bound to CUDA needs a CUDA device'))])
def test_every_collective_of_a_training_step_runs_on_the_device_its_process_group_serves(tiny_config, tmp_path,
                                                                                         backend):
    """NCCL serves CUDA tensors only: with a group bound to CUDA ('cuda:gloo' on one GPU stands in for NCCL), a
    tensor built on the CPU for a collective (a Gram matrix, a loss normaliser, a flag) would raise. Every aggregator
    level, GradNorm, MoCo's gathered keys, the normalisers and the evaluation merges run here."""
    device = 'cuda:0' if backend.startswith('cuda') else 'cpu'
    cfgs = {}
    for name, aggregator in [('feature-surgery', dict(type='AlignedMTLUB')), ('gradnorm', dict(type='GradNorm')),
                             ('pcgrad', dict(type='PCGrad', seed=1))]:
        cfg = supervised_and_contrastive(tiny_config, 2, aggregator, **{
            'train_cfg.max_iters': 2, 'train_cfg.val_interval': 2, 'checkpoint_cfg.interval': 2,
            'env_cfg.device': device})
        cfg.tasks['contrastive']['head'] = dict(type='MoCoV3Head', hidden_dim=32, out_dim=16, proj_layers=2,
                                                pred_layers=2, temperature=0.2, momentum=0.99)
        cfgs[name] = cfg.to_dict()
    mp.spawn(train_and_record_on_rank, args=(free_port(), backend, cfgs, tmp_path), nprocs=WORLD_SIZE, join=True)
    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f'collectives{rank}.pt', weights_only=True)
        assert result['device'].startswith(device.split(':')[0])
        assert result['count'] > 0 and result['wrong'] == [], result


def test_the_collective_device_is_the_one_the_process_group_serves(monkeypatch):
    from mtvision.distributed import collective_device

    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)  # no CUDA device is needed to decide
    for backend, expected in [('gloo', 'cpu'), ('cpu:gloo', 'cpu'), ('cuda:gloo', 'cuda:0')]:
        dist.init_process_group(backend, init_method=f'tcp://127.0.0.1:{free_port()}', rank=0, world_size=1)
        try:
            assert collective_device() == torch.device(expected), backend
        finally:
            dist.destroy_process_group()


def resume_on_rank(rank: int, port: int, cfg_dict: dict, work_dirs: list, out_dir) -> None:
    with process_group(rank, port):
        try:
            trainer = Trainer(Config(cfg_dict), work_dirs[rank], resume='auto', validate=False)
            torch.save(dict(step=trainer.step), out_dir / f'resumed{rank}.pt')
        except FileNotFoundError as error:  # every rank raises it: none waits at the barrier alone
            torch.save(dict(error=str(error)), out_dir / f'resumed{rank}.pt')


def test_rank_zero_decides_the_checkpoint_every_rank_resumes_from(tiny_config, tmp_path):
    """Work dirs that differ between nodes (node-local disks, a stale view of a shared file system): every rank
    resumes from rank 0's last checkpoint, or every rank stops with an error naming the ranks that lack it."""
    cfg = tiny_config(**{'train_cfg.max_iters': 4, 'checkpoint_cfg.interval': 2, 'checkpoint_cfg.max_keep': 5})
    Trainer(cfg, tmp_path / 'node0', validate=False).train()
    shutil.copytree(tmp_path / 'node0', tmp_path / 'stale')
    (tmp_path / 'stale' / 'last_checkpoint').write_text('iter_2')  # this node's view lags behind
    shutil.copytree(tmp_path / 'node0', tmp_path / 'behind')
    shutil.rmtree(tmp_path / 'behind' / 'iter_4')
    (tmp_path / 'behind' / 'last_checkpoint').write_text('iter_2')

    for other, expected in [('stale', [{'step': 4}, {'step': 4}]), ('behind', None)]:
        out = tmp_path / f'out_{other}'
        out.mkdir()
        mp.spawn(resume_on_rank, args=(free_port(), cfg.to_dict(), [tmp_path / 'node0', tmp_path / other], out),
                 nprocs=WORLD_SIZE, join=True)
        results = [torch.load(out / f'resumed{rank}.pt', weights_only=True) for rank in range(WORLD_SIZE)]
        if expected is not None:
            assert results == expected
        else:  # every rank stops, none waits for the others
            assert all('ranks [1] cannot read' in result['error'] and 'iter_4' in result['error']
                       for result in results), results


def exchange_on_rank(rank: int, port: int, cfg_dicts: dict, out_dir) -> None:
    from mtvision.distributed import GradientReducer

    with process_group(rank, port):
        # the guarantees of the exchange on a toy model: rank 0's loss reaches a and b, rank 1's only a, none c
        a, b, c = (torch.nn.Parameter(torch.full((3,), float(i + 1))) for i in range(3))
        reducer = GradientReducer([a, b, c], bucket_cap_mb=1e-5)  # a bucket each
        reducer.prepare([c, b, a])
        loss = (a * (rank + 1)).sum() + ((b * b).sum() if rank == 0 else 0)
        with reducer.overlap([loss]):
            loss.backward()
            launched_in_backward = len(reducer._launched)
        reducer.finish()
        toy = dict(a=a.grad.clone(), b=b.grad.clone(), c=c.grad, launched_in_backward=launched_in_backward)
        # a training step per config, with the bytes each collective is handed
        steps = {}
        for name, cfg_dict in cfg_dicts.items():
            trainer = Trainer(Config(cfg_dict), out_dir / name, validate=False)
            iterators = trainer._train_iterators()
            log = []  # (collective, elements it is handed)
            restore = spy_on_collectives(lambda op, tensors: log.append((op, max(t.numel() for t in tensors))))
            trainer._forward_backward(list(trainer.tasks), iterators)
            restore()
            steps[name] = dict(log=log, grads={n: p.grad.clone() for n, p in trainer.model.named_parameters()
                                               if p.grad is not None},
                               gradient_size=sum(p.numel() for p in trainer.model.shared_parameters()),
                               head_size=sum(p.numel() for task in trainer.tasks
                                             for p in trainer.model.task_parameters(task)),
                               tasks=len(trainer.tasks))
        torch.save(dict(toy=toy, steps=steps), out_dir / f'exchange{rank}.pt')


def test_gradients_are_exchanged_during_the_backward_and_surgery_moves_half_the_bytes(tiny_config, tmp_path):
    """The buckets go out while the backward runs (all but those the loss reaches last); a parameter one rank
    reached gets the average with zeros for the other, one no rank reached keeps no gradient; the overlapped
    exchange gives the same gradients as the exchange after the backward. Parameter-level surgery with T tasks
    hands (T + 1) / 2 gradient sizes to its collectives under a ring algorithm (the per-task gradients
    reduce-scattered, the update all-gathered), where all-reducing them and then the update moved T + 1."""
    cfgs = {'overlap': supervised_and_contrastive(tiny_config, 2, dict(type='WeightedSum'), contrastive=False, **{
                'env_cfg.ddp_cfg': dict(bucket_cap_mb=0.05)}),
            'after-backward': supervised_and_contrastive(tiny_config, 2, dict(type='WeightedSum'), contrastive=False,
                                                         **{'env_cfg.ddp_cfg': dict(overlap=False,
                                                                                    bucket_cap_mb=0.05)}),
            'pcgrad': supervised_and_contrastive(tiny_config, 2, dict(type='PCGrad', seed=1), contrastive=False)}
    mp.spawn(exchange_on_rank, args=(free_port(), {k: v.to_dict() for k, v in cfgs.items()}, tmp_path),
             nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f'exchange{rank}.pt', weights_only=True) for rank in range(WORLD_SIZE)]
    for result in results:
        toy = result['toy']
        assert toy['launched_in_backward'] == 3  # c (unreached) at once, then b and a as the backward reaches them
        assert torch.equal(toy['a'], torch.full((3,), 1.5))  # (1 + 2) / 2
        assert torch.equal(toy['b'], torch.full((3,), 2.0))  # rank 0's 2 * b = 4, averaged with rank 1's zeros
        assert toy['c'] is None

        steps = result['steps']
        overlap, after = steps['overlap'], steps['after-backward']
        assert overlap['grads'].keys() == after['grads'].keys()
        assert all(torch.equal(overlap['grads'][n], after['grads'][n]) for n in overlap['grads'])
        assert sum(op == 'all_reduce' for op, _ in overlap['log']) > 3  # several buckets

        surgery = steps['pcgrad']
        ring_factor = {'all_reduce': 2 * (WORLD_SIZE - 1) / WORLD_SIZE}
        ring_factor.update(dict.fromkeys(['reduce_scatter_tensor', 'reduce_scatter_single', 'all_gather_into_tensor',
                                          'all_gather_single'], (WORLD_SIZE - 1) / WORLD_SIZE))
        moved = sum(ring_factor[op] * numel for op, numel in surgery['log'])
        size, tasks, heads = surgery['gradient_size'], surgery['tasks'], surgery['head_size']
        # the heads' gradients are all-reduced once, with a flag per parameter; the Gram matrix is T x T
        expected = (tasks + 1) / 2 * size + heads
        assert expected <= moved <= expected + 1000, (surgery['log'], size, heads)
