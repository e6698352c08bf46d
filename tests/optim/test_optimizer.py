import math

import pytest
import torch
from torch import nn

from mtvision.optim import WeightedSum, build_optimizer, check_schedule, param_groups, scheduled_lr


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
