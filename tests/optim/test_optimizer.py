import math

import pytest
import torch
from torch import nn

from mtvision.optim import WeightedSum, build_optimizer, check_schedule, param_groups, scheduled_lr
from mtvision.optim.optimizer import auto_scaled_lr


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.linear = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def no_weight_decay(self):
        return {'pos_embed'}


def test_no_decay_on_norms_biases_and_listed_names():
    model = TinyModel()
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert [id(p) for p in decay['params']] == [id(model.linear.weight)]
    assert {id(p) for p in no_decay['params']} == {id(model.pos_embed), id(model.linear.bias), id(model.norm.weight),
                                                   id(model.norm.bias)}
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0.0


def test_unknown_optimizer_and_argument_are_named():
    with pytest.raises(KeyError, match='Lion'):
        build_optimizer(TinyModel(), dict(type='Lion', lr=1e-3))
    with pytest.raises(TypeError, match='optim_wrapper.optimizer'):
        build_optimizer(TinyModel(), dict(type='AdamW', lr=1e-3, momentumm=0.9))


def test_warmup_then_cosine_matches_formula():
    phases = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10),
              dict(type='CosineAnnealingLR', eta_min=0.01, by_epoch=False, begin=10, end=110)]
    check_schedule(phases)
    assert scheduled_lr(1.0, 0, phases) == pytest.approx(0.1)
    assert scheduled_lr(1.0, 5, phases) == pytest.approx(0.1 + 0.9 * 0.5)
    assert scheduled_lr(1.0, 10, phases) == pytest.approx(1.0)
    assert scheduled_lr(1.0, 60, phases) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert scheduled_lr(1.0, 110, phases) == pytest.approx(0.01)
    assert scheduled_lr(1.0, 500, phases) == pytest.approx(0.01)


def test_schedule_errors_name_the_phase():
    with pytest.raises(ValueError, match=r'param_scheduler\[1\].*overlap'):
        check_schedule([dict(type='LinearLR', begin=0, end=10), dict(type='CosineAnnealingLR', begin=5, end=20)])
    with pytest.raises(KeyError, match=r'param_scheduler\[0\]'):
        check_schedule([dict(type='StepLR', begin=0, end=10)])
    with pytest.raises(KeyError, match='eta_minn'):
        check_schedule([dict(type='CosineAnnealingLR', begin=0, end=10, eta_minn=0)])


def test_weighted_sum_gradient_equals_weighted_task_gradients():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5))
    x1, x2 = torch.randn(5), torch.randn(5)
    losses = {'a': (w * x1).sum() ** 2, 'b': (w * x2).sum().sin()}
    expected = 2.0 * torch.autograd.grad(losses['a'], w, retain_graph=True)[0] + \
        0.5 * torch.autograd.grad(losses['b'], w, retain_graph=True)[0]
    WeightedSum({'a': 2.0, 'b': 0.5}).backward(losses, [w])
    torch.testing.assert_close(w.grad, expected)
    with pytest.raises(KeyError, match="'c'"):
        WeightedSum({'a': 1.0}).backward({'c': w.sum()}, [w])


@pytest.mark.parametrize('world_size, accumulate_steps, expected', [(8, 1, 1e-3), (16, 1, 2e-3), (4, 1, 5e-4),
                                                                     (4, 2, 1e-3), (1, 1, 1.25e-4)])
def test_auto_scaled_lr_follows_the_linear_scaling_rule(world_size, accumulate_steps, expected):
    batch_sizes = {'cls': 64, 'det': 32}  # the base of 512 refers to 8 GPUs x 64 classification images
    lr, message = auto_scaled_lr(dict(type='AdamW', lr=1e-3), dict(base_batch_size=512, enable=True, task='cls'),
                                 world_size, batch_sizes, accumulate_steps)
    assert lr == pytest.approx(expected, rel=1e-12)
    assert f'{world_size * 64 * accumulate_steps}, base 512' in message and '(cls)' in message


def test_auto_scaled_lr_off_or_absent_keeps_the_lr_and_one_batch_needs_no_task():
    assert auto_scaled_lr(dict(lr=3e-4), None, 16, {'cls': 64})[0] == 3e-4
    assert auto_scaled_lr(dict(lr=3e-4), dict(base_batch_size=512, enable=False), 16, {'cls': 64})[0] == 3e-4
    assert auto_scaled_lr(dict(lr=3e-4), dict(base_batch_size=256, enable=True), 2, {'a': 64, 'b': 64})[0] == \
        pytest.approx(1.5e-4)


@pytest.mark.parametrize('auto_scale_lr, batch_sizes, error, message', [
    (dict(base_batch_size=512, enable=True), {'cls': 64, 'det': 32}, ValueError, 'auto_scale_lr.task must name'),
    (dict(base_batch_size=512, enable=True, task='seg'), {'cls': 64}, KeyError, "task='seg' is not one of"),
    (dict(base_batch_size='512', enable=True), {'cls': 64}, ValueError, 'base_batch_size must be a positive int'),
    (dict(base_batch_sise=512, enable=True), {'cls': 64}, KeyError, 'base_batch_sise'),
])
def test_auto_scaled_lr_bad_settings_name_the_key(auto_scale_lr, batch_sizes, error, message):
    with pytest.raises(error, match=message):
        auto_scaled_lr(dict(lr=1e-3), auto_scale_lr, 8, batch_sizes)


def test_fused_defaults_to_torchs_choice_on_cpu_and_passes_through():
    # None on CPU: torch's default kernels (fused only where every parameter is on CUDA)
    assert build_optimizer(TinyModel(), dict(type='AdamW', lr=1e-3)).defaults['fused'] is None
    assert build_optimizer(TinyModel(), dict(type='AdamW', lr=1e-3, fused=False)).defaults['fused'] is False
    assert build_optimizer(TinyModel(), dict(type='AdamW', lr=1e-3, foreach=True)).defaults['foreach'] is True


def test_fused_on_cpu_takes_the_same_steps_as_the_default():
    # torch has a fused CPU kernel: fused=True is honoured there, not refused, and updates like the default
    models = [TinyModel(), TinyModel()]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [build_optimizer(model, dict(type='AdamW', lr=1e-2, weight_decay=0.05, fused=fused))
                  for model, fused in zip(models, (None, True))]
    assert optimizers[1].defaults['fused'] is True
    x = torch.randn(3, 4, 8)
    for _ in range(3):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            (model.norm(model.linear(x + model.pos_embed)) ** 2).mean().backward()
            optimizer.step()
    # the kernels round differently: equal to a thousandth of one step (lr 1e-2)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_contradictory_fused_settings_name_the_config_key():
    with pytest.raises(RuntimeError, match='optim_wrapper.optimizer: .*fused'):
        build_optimizer(TinyModel(), dict(type='AdamW', lr=1e-3, fused=True, foreach=True))


def test_poly_schedule_follows_mmengines_poly_lr():
    from mmengine.optim import PolyLR

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    reference = PolyLR(optimizer, eta_min=1e-4, power=0.9, begin=0, end=20, by_epoch=False)
    phases = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=20, by_epoch=False)]
    check_schedule(phases)
    for step in range(25):
        assert scheduled_lr(0.1, step, phases) == pytest.approx(optimizer.param_groups[0]['lr'], rel=1e-6), step
        optimizer.step()
        reference.step()
