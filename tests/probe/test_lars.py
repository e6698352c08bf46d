import math

import pytest
import torch

from mtvision.optim.lars import LARS


def _step(optimizer, params, grads):
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    optimizer.step()


def test_one_and_two_steps_match_the_formula_by_hand():
    weight = torch.nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # norm 5
    bias = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    weight_grad = torch.tensor([[-1.5, 3.0], [4.0, -2.0]])
    bias_grad = torch.tensor([0.2, 0.4])
    optimizer = LARS([weight, bias], lr=0.5, weight_decay=0.5, momentum=0.9, trust_coefficient=0.1)

    # step 1: g + wd * p = [[0, 3], [4, 0]] (norm 5); ratio 0.1 * 5 / 5; mu = [[0, .3], [.4, 0]]; p -= 0.5 * mu
    _step(optimizer, [weight, bias], [weight_grad, bias_grad])
    torch.testing.assert_close(weight.detach(), torch.tensor([[3.0, -0.15], [-0.2, 4.0]]))
    # the bias (ndim 1) skips decay and scaling: p -= 0.5 * g
    torch.testing.assert_close(bias.detach(), torch.tensor([0.9, -1.2]))

    # step 2: g + wd * p = [[0, 2.925], [3.9, 0]] (norm 4.875); ||p|| = sqrt(9 + 0.0225 + 0.04 + 16)
    _step(optimizer, [weight, bias], [weight_grad, bias_grad])
    ratio = 0.1 * math.sqrt(25.0625) / 4.875
    mu = [[0.0, 0.9 * 0.3 + ratio * 2.925], [0.9 * 0.4 + ratio * 3.9, 0.0]]
    expected = [[3.0, -0.15 - 0.5 * mu[0][1]], [-0.2 - 0.5 * mu[1][0], 4.0]]
    torch.testing.assert_close(weight.detach(), torch.tensor(expected))
    # bias momentum: 0.9 * 0.2 + 0.2 = 0.38 and 0.9 * 0.4 + 0.4 = 0.76
    torch.testing.assert_close(bias.detach(), torch.tensor([0.9 - 0.5 * 0.38, -1.2 - 0.5 * 0.76]))


def test_zero_norms_leave_the_update_unscaled():
    zero_weight = torch.nn.Parameter(torch.zeros(2, 3))
    weight = torch.nn.Parameter(torch.ones(2, 2))
    grad = torch.arange(6.0).view(2, 3)
    optimizer = LARS([zero_weight, weight], lr=0.1, momentum=0.0, trust_coefficient=0.001)
    _step(optimizer, [zero_weight, weight], [grad, torch.zeros(2, 2)])
    torch.testing.assert_close(zero_weight.detach(), -0.1 * grad)  # ||p|| = 0: ratio 1
    torch.testing.assert_close(weight.detach(), torch.ones(2, 2))  # ||g|| = 0: nothing moves


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match='momentum=1.5'):
        LARS([torch.nn.Parameter(torch.ones(2, 2))], lr=0.1, momentum=1.5)
