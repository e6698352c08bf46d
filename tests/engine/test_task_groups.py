"""Task groups: tasks labelled on the same images draw one batch and share one backbone forward."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mmengine.config import Config

from mtvision.checkpoint import read_weights
from mtvision.config import ConfigError, load_config
from mtvision.data.collate import group_collate_fn
from mtvision.engine import Trainer
from mtvision.models import build_model
from mtvision.registry import AGGREGATORS
from mtvision.tasks import build_tasks

GROUPED = 'configs/shared/seg-depth-normals-group_tags_vit-tiny-p8_600it_synthetic.py'
SEPARATE = 'configs/shared/seg-depth-normals-tags_vit-tiny-p8_600it_synthetic.py'
GROUP = ('seg', 'depth', 'normals')


def group_batch_and_model(tiny_config):
    cfg = tiny_config(GROUPED)
    tasks = build_tasks(cfg.tasks, val=False, groups_cfg=cfg.task_groups)
    torch.manual_seed(0)
    model = build_model(cfg, tasks)
    dataset = tasks['seg'].train_dataset
    assert all(tasks[name].train_dataset is dataset for name in GROUP)  # one dataset object for the group
    torch.manual_seed(1)  # the flips of the training pipeline
    batch = group_collate_fn('scenes', [tasks[name] for name in GROUP])([dataset[i] for i in range(3)])
    return model, batch


def count_backbone_calls(model) -> list:
    calls = []
    model.backbone.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    return calls


def test_one_group_forward_gives_each_task_the_loss_of_its_own_forward(tiny_config):
    model, batch = group_batch_and_model(tiny_config)
    calls = count_backbone_calls(model)
    grouped = model.group_losses(GROUP, batch)
    assert calls == [3]
    separate = {name: model.loss(name, dict(images=batch['images'], targets=batch['targets'][name])) for name in GROUP}
    assert calls == [3, 3, 3, 3]
    for name in GROUP:
        assert grouped[name].keys() == separate[name].keys()
        for term in grouped[name]:
            torch.testing.assert_close(grouped[name][term], separate[name][term], rtol=1e-6, atol=1e-7)


def test_a_groups_gradients_are_the_weighted_sum_of_its_tasks_gradients(tiny_config):
    model, batch = group_batch_and_model(tiny_config)
    weights = {'seg': 1.0, 'depth': 0.5, 'normals': 2.0}
    params = [p for p in model.parameters() if p.requires_grad]
    separate = sum(weights[name] * sum(model.loss(name, dict(images=batch['images'],
                                                             targets=batch['targets'][name])).values())
                   for name in GROUP)
    expected = torch.autograd.grad(separate, params, allow_unused=True)
    losses = {name: sum(terms.values()) for name, terms in model.group_losses(GROUP, batch).items()}
    shared = list(model.shared_parameters())
    AGGREGATORS.build(dict(type='WeightedSum', loss_weights=weights)).backward(
        losses, shared, {name: list(model.task_parameters(name)) for name in GROUP})
    for param, grad in zip(params, expected):
        if grad is None:
            assert param.grad is None
        else:
            torch.testing.assert_close(param.grad, grad, rtol=1e-5, atol=1e-7)


def test_feature_level_surgery_sees_cross_terms_of_a_groups_shared_features(tiny_config):
    model, batch = group_batch_and_model(tiny_config)
    task_params = {name: list(model.task_parameters(name)) for name in GROUP}

    def cosines(shared_forward: bool) -> dict:
        aggregator = AGGREGATORS.build(dict(type='AlignedMTLUB', loss_weights=dict.fromkeys(GROUP, 1.0)))
        model.zero_grad(set_to_none=True)
        with model.capturing_features() as features:
            if shared_forward:
                terms = model.group_losses(GROUP, batch)
            else:
                terms = {name: model.loss(name, dict(images=batch['images'], targets=batch['targets'][name]))
                         for name in GROUP}
        losses = {name: sum(task_terms.values()) for name, task_terms in terms.items()}
        scalars = aggregator.backward(losses, list(model.shared_parameters()), task_params, features=features)
        return {key: value for key, value in scalars.items() if key.startswith('surgery/cosine/')}

    separate, grouped = cosines(False), cosines(True)
    assert len(grouped) == 3
    assert all(value == 0 for value in separate.values())  # one forward per task: orthogonal representations
    assert all(abs(value) > 1e-3 for value in grouped.values())  # one shared representation: real cross terms


def grouped_config(tiny_config, max_iters: int, **options) -> Config:
    return tiny_config(GROUPED, **{'train_cfg.max_iters': max_iters, 'train_cfg.val_interval': max_iters,
                                   'checkpoint_cfg.interval': 2, 'train_cfg.val_at_start': False, **options})


def test_a_grouped_run_draws_one_batch_per_group_and_resumes_exactly(tiny_config, tmp_path):
    straight = Trainer(grouped_config(tiny_config, 4), tmp_path / 'straight', validate=False)
    calls = count_backbone_calls(straight.model)
    straight.train()
    assert len(calls) == 4 * 2  # each step: one forward for seg + depth + normals, one for tags
    assert straight.samples_drawn == {'scenes': 4 * 2, 'tags': 4 * 2}  # the tiny configs' batch size 2
    Trainer(grouped_config(tiny_config, 2), tmp_path / 'resumed', validate=False).train()
    resumed = Trainer(grouped_config(tiny_config, 4), tmp_path / 'resumed', resume='auto', validate=False)
    assert resumed.step == 2 and resumed.samples_drawn == {'scenes': 4, 'tags': 4}
    resumed.train()
    expected, got = read_weights(tmp_path / 'straight'), read_weights(tmp_path / 'resumed')
    assert all(torch.equal(expected[key], got[key]) for key in expected)


def test_group_configs_are_checked(tiny_config, tmp_path):
    cfg = load_config(GROUPED).to_dict()
    bad = dict(cfg, tasks=dict(cfg['tasks'], seg=dict(cfg['tasks']['seg'], batch_size=4)))
    with pytest.raises(ConfigError, match=r"tasks.seg is in group 'scenes', which draws its training batches: remove "
                                          r"tasks.seg.batch_size"):
        load_config_from(bad)
    bad = dict(cfg, tasks=dict(cfg['tasks'], seg=dict(cfg['tasks']['seg'], group='rooms')))
    with pytest.raises(ConfigError, match=r"tasks.seg.group='rooms' names no group of task_groups \['scenes'\]"):
        load_config_from(bad)
    lonely = dict(cfg, task_groups=dict(cfg['task_groups'], empty=cfg['task_groups']['scenes']))
    with pytest.raises(ConfigError, match="task_groups.empty has no task"):
        load_config_from(lonely)
    # a head that needs a forward of its own cannot share one
    with_mae = tiny_config(GROUPED)
    with_mae.tasks['seg'] = dict(with_mae.tasks['seg'], type='mae', head=dict(type='MAEHead'), metric={})
    with pytest.raises(ValueError, match=r"tasks.seg is in task group 'scenes'.*\(MAEHead\) needs a forward of its "
                                         r"own"):
        Trainer(with_mae, tmp_path, validate=False)


def load_config_from(cfg_dict: dict):
    from mtvision.config import check_config
    check_config(cfg_dict)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def deterministic_grouped(tiny_config, batch_size: int, aggregator: dict) -> Config:
    """The grouped config without random augmentation (both runs see the same inputs), SGD (an update linear in
    the gradient), every task every step."""
    cfg = tiny_config(GROUPED, **{'train_cfg.max_iters': 4, 'checkpoint_cfg.interval': 4, 'mixer.strategy': 'all',
                                  'aggregator': aggregator, 'param_scheduler': [],
                                  'optim_wrapper.optimizer': dict(_delete_=True, type='SGD', lr=0.02, momentum=0.9)})
    cfg.task_groups['scenes']['train_dataset']['pipeline'] = cfg.tasks['depth']['val_dataset']['pipeline']
    cfg.task_groups['scenes']['batch_size'] = batch_size
    cfg.tasks['tags']['train_dataset']['pipeline'] = cfg.tasks['tags']['val_dataset']['pipeline']
    cfg.tasks['tags']['batch_size'] = batch_size
    return cfg


def train_on_rank(rank: int, port: int, cfg_dicts: dict, work_dir) -> None:
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    try:
        for name, cfg_dict in cfg_dicts.items():
            Trainer(Config(cfg_dict), work_dir / name, validate=False).train()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_grouped_run_on_two_processes_trains_like_one_on_the_global_batch(tiny_config, tmp_path):
    aggregators = {'weighted-sum': dict(type='WeightedSum'), 'aligned-mtl-ub': dict(type='AlignedMTLUB')}
    cfgs = {name: deterministic_grouped(tiny_config, 2, aggregator).to_dict()
            for name, aggregator in aggregators.items()}
    mp.spawn(train_on_rank, args=(free_port(), cfgs, tmp_path / 'ddp'), nprocs=2, join=True)
    for name, aggregator in aggregators.items():
        single = Trainer(deterministic_grouped(tiny_config, 4, aggregator), tmp_path / 'single' / name, validate=False)
        single.train()
        expected, got = single.model.state_dict(), read_weights(tmp_path / 'ddp' / name)
        parameters = {key for key, _ in single.model.named_parameters()}
        worst = max(float((got[key].double() - expected[key].double()).abs().max()) for key in parameters)
        assert worst <= 1e-5, (name, worst)
