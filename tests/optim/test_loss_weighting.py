"""Uncertainty weighting and GradNorm against gradients derived by hand on a tiny linear model.

The model: ``z = W x`` (shared), one linear head ``h_t`` per task, ``L_t = (h_t . z - y_t)^2``, so
``dL_t/dW = 2 e_t h_t x^T`` with ``e_t = h_t . z - y_t``, ``||dL_t/dW|| = 2 |e_t| ||h_t|| ||x||`` and
``dL_t/dh_t = 2 e_t z``. The references below are written in plain Python floats from these formulas.
"""
import io
import math

import pytest
import torch
from torch import nn

from mtvision.models.multitask import MultiTaskModel
from mtvision.optim.aggregators import Aggregator
from mtvision.optim.loss_weighting import GradNorm, UncertaintyWeighting
from mtvision.registry import AGGREGATORS

X = [1.0, 2.0, -1.0]
W0 = [[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]]
HEAD = {'a': [1.0, 2.0], 'b': [-1.0, 0.5]}


class Tiny(nn.Module):
    def __init__(self, tasks=('a', 'b')):
        super().__init__()
        self.shared = nn.Linear(3, 2, bias=False)
        self.heads = nn.ModuleDict({t: nn.Linear(2, 1, bias=False) for t in tasks})
        with torch.no_grad():
            self.shared.weight.copy_(torch.tensor(W0))
            for t in tasks:
                self.heads[t].weight.copy_(torch.tensor([HEAD[t]]))

    def losses(self, targets: dict[str, float]) -> dict[str, torch.Tensor]:
        z = self.shared(torch.tensor(X))
        return {t: ((self.heads[t](z) - y) ** 2).squeeze() for t, y in targets.items()}


def hand(targets: dict[str, float]) -> dict:
    """Per task: z, e_t, L_t, ||dL_t/dW|| and dL_t/dW from the closed forms (plain floats)."""
    z = [sum(w * x for w, x in zip(row, X)) for row in W0]
    norm_x = math.sqrt(sum(x * x for x in X))
    out = {'z': z}
    for t, y in targets.items():
        h = HEAD[t]
        e = h[0] * z[0] + h[1] * z[1] - y
        out[t] = dict(e=e, loss=e * e, norm=2 * abs(e) * math.hypot(*h) * norm_x,
                      dw=[[2 * e * h[i] * X[j] for j in range(3)] for i in range(2)])
    return out


def close(tensor, expected, **kwargs):
    torch.testing.assert_close(tensor, torch.tensor(expected, dtype=tensor.dtype), rtol=1e-5, atol=1e-6, **kwargs)


# ------------------------------------------------------------------------------------------- uncertainty weighting

def test_uncertainty_gradients_match_the_hand_derivation_with_scale():
    lw = {'a': 2.0, 'b': 0.5}
    log_var = {'a': 0.3, 'b': -0.7}
    c = 4.0  # a grad scaler's factor: every gradient must be c times the unscaled objective's
    model, agg = Tiny(), UncertaintyWeighting(lw)
    with torch.no_grad():
        for t, s in log_var.items():
            agg.log_variances[t].fill_(s)
    targets = {'a': -5.0, 'b': 0.5}
    scalars = agg.backward({t: c * loss for t, loss in model.losses(targets).items()}, [model.shared.weight],
                           scale=c)
    ref = hand(targets)
    # objective sum_t lw_t (exp(-s_t) L_t + s_t) / 2
    for t in lw:
        s, loss = log_var[t], ref[t]['loss']
        close(agg.log_variances[t].grad, c * lw[t] * (1 - math.exp(-s) * loss) / 2, msg=t)
        effective = lw[t] * math.exp(-s) / 2
        close(scalars[f'uncertainty/weight/{t}'], effective)
        close(scalars[f'uncertainty/log_variance/{t}'], s)
        close(model.heads[t].weight.grad, [[c * effective * 2 * ref[t]['e'] * zi for zi in ref['z']]], msg=t)
    dw = [[c * sum(lw[t] * math.exp(-log_var[t]) / 2 * ref[t]['dw'][i][j] for t in lw) for j in range(3)]
          for i in range(2)]
    close(model.shared.weight.grad, dw)


def test_uncertainty_accumulation_equals_one_step_on_the_mean_loss_and_absent_tasks_get_nothing():
    lw = {'a': 1.0, 'b': 3.0, 'c': 1.0}
    model, agg = Tiny(), UncertaintyWeighting(lw, init_log_variance=0.2)
    micro = [{'a': -5.0, 'b': 0.5}, {'a': 1.0, 'b': -2.0}]
    for targets in micro:  # two micro-batches, each loss divided by 2 as the trainer does
        agg.backward({t: loss / 2 for t, loss in model.losses(targets).items()}, [model.shared.weight], scale=0.5)
    assert agg.log_variances['c'].grad is None
    mean_loss = {t: sum(hand(m)[t]['loss'] for m in micro) / 2 for t in ('a', 'b')}
    for t in ('a', 'b'):
        close(agg.log_variances[t].grad, lw[t] * (1 - math.exp(-0.2) * mean_loss[t]) / 2, msg=t)

    model.zero_grad()
    scalars = UncertaintyWeighting(lw).backward(model.losses({'b': 0.0}), [model.shared.weight])
    assert sorted(scalars) == ['uncertainty/log_variance/b', 'uncertainty/weight/b']
    assert model.heads['a'].weight.grad is None


def test_uncertainty_state_round_trip_and_mismatched_tasks():
    agg = UncertaintyWeighting({'a': 1.0, 'b': 1.0})
    with torch.no_grad():
        agg.log_variances['a'].fill_(-1.25)
    buffer = io.BytesIO()
    torch.save(agg.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = UncertaintyWeighting({'a': 1.0, 'b': 1.0})
    restored.load_state_dict(state)
    assert restored.log_variances['a'].item() == -1.25 and restored.log_variances['b'].item() == 0.0
    with pytest.raises(RuntimeError, match="log_variances.c"):
        UncertaintyWeighting({'a': 1.0, 'c': 1.0}).load_state_dict(state)


# ------------------------------------------------------------------------------------------------------- GradNorm

def paper_weight_gradients(model: Tiny, lw: dict, weights: dict, initial: dict, targets: dict, alpha: float):
    """The paper's recipe with autograd: G_t = ||grad_W(w_t L_t)|| through a second-order graph."""
    losses = model.losses(targets)
    w = {t: torch.tensor(weights[t], requires_grad=True) for t in targets}
    g = torch.stack([torch.autograd.grad(w[t] * lw[t] * losses[t], model.shared.weight, create_graph=True)[0].norm()
                     for t in targets])
    rates = torch.tensor([losses[t].item() / initial[t] for t in targets])
    target = g.mean().detach() * (rates / rates.mean()) ** alpha
    return dict(zip(targets, torch.autograd.grad((g - target).abs().sum(), list(w.values()))))


def test_gradnorm_weight_and_network_gradients_match_the_hand_computation():
    lw, alpha = {'a': 2.0, 'b': 0.5, 'c': 1.0}, 1.5  # 'c' never shows up: T = 3, the rest over the tasks present
    model, agg = Tiny(), GradNorm(lw, alpha=alpha)
    first, second = {'a': -5.0, 'b': 0.5}, {'a': -6.0, 'b': -2.0}  # rates 1/4 and 9/4
    agg.backward(model.losses(first), [model.shared.weight])  # records L_t(0)
    close(agg.initial_losses[:2], [lw['a'] * hand(first)['a']['loss'], lw['b'] * hand(first)['b']['loss']])
    assert torch.isnan(agg.initial_losses[2])
    model.zero_grad(set_to_none=True)
    agg.zero_grad(set_to_none=True)
    with torch.no_grad():  # as if an update had moved them: the next backward renormalises to sum 3
        for t, v in {'a': 1.5, 'b': 0.3, 'c': 2.2}.items():
            agg.task_weights[t].fill_(v)
    scalars = agg.backward(model.losses(second), [model.shared.weight])

    ref0, ref = hand(first), hand(second)
    w = {t: 3 * v / 4.0 for t, v in {'a': 1.5, 'b': 0.3, 'c': 2.2}.items()}
    n = {t: lw[t] * ref[t]['norm'] for t in ('a', 'b')}
    g = {t: w[t] * n[t] for t in n}
    rate = {t: ref[t]['loss'] / ref0[t]['loss'] for t in n}
    r = {t: rate[t] / ((rate['a'] + rate['b']) / 2) for t in n}
    target = {t: (g['a'] + g['b']) / 2 * r[t] ** alpha for t in n}
    for t in n:
        expected = math.copysign(n[t], g[t] - target[t])
        close(agg.task_weights[t].grad, expected, msg=t)
        close(scalars[f'gradnorm/weight/{t}'], w[t])
        close(scalars[f'gradnorm/grad_norm/{t}'], g[t])
        close(scalars[f'gradnorm/ratio/{t}'], r[t])
        close(model.heads[t].weight.grad, [[w[t] * lw[t] * 2 * ref[t]['e'] * zi for zi in ref['z']]], msg=t)
    close(scalars['gradnorm/loss'], sum(abs(g[t] - target[t]) for t in n))
    assert agg.task_weights['c'].grad is None
    close(torch.stack(list(agg.task_weights.values())).detach().sum(), 3.0)
    # the network: the gradient of sum_t w_t L_t, weights held fixed
    dw = [[sum(w[t] * lw[t] * ref[t]['dw'][i][j] for t in n) for j in range(3)] for i in range(2)]
    close(model.shared.weight.grad, dw)
    # and the first-order shortcut agrees with the paper's second-order computation
    paper = paper_weight_gradients(Tiny(), lw, w, {t: ref0[t]['loss'] for t in n}, second, alpha)
    for t in n:
        torch.testing.assert_close(agg.task_weights[t].grad, paper[t], rtol=1e-5, atol=1e-6)


def test_gradnorm_renormalises_to_the_task_count_with_a_positive_floor():
    agg = GradNorm({'a': 1.0, 'b': 1.0, 'c': 1.0, 'd': 1.0})
    with torch.no_grad():
        for t, v in {'a': 4.0, 'b': 2.0, 'c': 2.0, 'd': -1.0}.items():
            agg.task_weights[t].fill_(v)
    agg.renormalize()
    total = 8.0 + 1e-3
    close(torch.stack(list(agg.task_weights.values())), [4 * v / total for v in (4.0, 2.0, 2.0, 1e-3)])


def test_gradnorm_scale_multiplies_the_weight_gradient_and_leaves_the_rest():
    lw = {'a': 1.0, 'b': 1.0}
    grads, logs = [], []
    for c in (1.0, 8.0):
        model, agg = Tiny(), GradNorm(lw, alpha=0.5)
        for targets in ({'a': -5.0, 'b': 0.5}, {'a': -6.5, 'b': 2.0}):
            agg.zero_grad(set_to_none=True)
            scalars = agg.backward({t: c * v for t, v in model.losses(targets).items()}, [model.shared.weight],
                                   scale=c)
        grads.append(torch.stack([agg.task_weights[t].grad for t in lw]))
        logs.append(torch.stack([scalars[k] for k in sorted(scalars)]))
        close(agg.initial_losses, [hand({'a': -5.0})['a']['loss'], hand({'b': 0.5})['b']['loss']])
    torch.testing.assert_close(grads[1], 8 * grads[0])
    torch.testing.assert_close(logs[1], logs[0])


def test_gradnorm_state_round_trip_continues_identically():
    lw = {'a': 1.0, 'b': 2.0}
    model, agg = Tiny(), GradNorm(lw)
    for targets in ({'a': -5.0, 'b': 0.5}, {'a': -4.0, 'b': 1.5}):
        agg.zero_grad(set_to_none=True)
        agg.backward(model.losses(targets), [model.shared.weight])
        with torch.no_grad():  # a plain SGD step on the weights
            for p in agg.task_weights.values():
                p -= 0.01 * p.grad
    buffer = io.BytesIO()
    torch.save(agg.state_dict(), buffer)
    buffer.seek(0)
    restored = GradNorm(lw)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(restored.initial_losses, agg.initial_losses)
    grads = []
    for aggregator in (agg, restored):
        aggregator.zero_grad(set_to_none=True)
        fresh = Tiny()
        aggregator.backward(fresh.losses({'a': -3.0, 'b': 3.0}), [fresh.shared.weight])
        grads.append(torch.stack([aggregator.task_weights[t].grad for t in lw]))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


class Stacked(nn.Module):
    """lin1 -> lin2 shared, with a trailing token that only task 'a' uses (like a SimMIM mask token)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin1, self.lin2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.token = nn.Parameter(torch.randn(1, 1, 2))
        self.heads = nn.ModuleDict({'a': nn.Linear(2, 1), 'b': nn.Linear(2, 1)})

    def losses(self) -> dict[str, torch.Tensor]:
        z = self.lin2(torch.tanh(self.lin1(torch.tensor([[0.5, -1.0, 2.0]]))))
        return {'a': self.heads['a'](z + self.token[0]).pow(2).sum(), 'b': self.heads['b'](z).pow(2).sum()}

    def shared(self) -> list[nn.Parameter]:
        return [self.lin1.weight, self.lin1.bias, self.lin2.weight, self.lin2.bias, self.token]


@pytest.mark.parametrize('layer', [None, 'lin1'])
def test_gradnorm_layer_default_skips_unreached_trailing_parameters_and_prefix_selects_by_name(layer):
    model = Stacked()
    expected_params = model.shared()[2:4] if layer is None else model.shared()[:2]
    reference = {t: torch.linalg.vector_norm(torch.cat([g.flatten() for g in torch.autograd.grad(
        loss, expected_params, retain_graph=True)])) for t, loss in model.losses().items()}
    agg = GradNorm({'a': 1.0, 'b': 1.0}, layer=layer)
    names = agg.bind_names((n, p) for n, p in model.named_parameters() if not n.startswith('heads'))
    assert names == ([] if layer is None else ['lin1.weight', 'lin1.bias'])
    for _ in range(2):  # the second step reuses the layer resolved by the first
        scalars = agg.backward(model.losses(), model.shared())
        for t in reference:
            torch.testing.assert_close(scalars[f'gradnorm/grad_norm/{t}'] / scalars[f'gradnorm/weight/{t}'],
                                       reference[t])


def test_gradnorm_default_layer_of_a_vit_is_the_last_mlp_and_final_norm():
    torch.manual_seed(0)
    backbone = dict(type='ViT', model_name='vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=2,
                    num_heads=2)
    heads = {t: dict(type='ClassificationHead', num_classes=3) for t in ('a', 'b')}
    model = MultiTaskModel(backbone, heads)
    images = torch.randn(2, 3, 32, 32)
    losses = {t: model.loss(t, dict(images=images, targets=torch.tensor([0, i])))['loss_cls']
              for i, t in enumerate(heads)}
    last = ('backbone.model.blocks.1.mlp.fc2.', 'backbone.model.norm.')
    named = dict(model.named_parameters())
    layer = [p for n, p in named.items() if n.startswith(last)]
    assert len(layer) == 4
    norms = {t: torch.linalg.vector_norm(torch.cat([g.flatten() for g in torch.autograd.grad(
        loss, layer, retain_graph=True)])) for t, loss in losses.items()}
    every = list(named.values())
    total = torch.autograd.grad(sum(losses.values()), every, retain_graph=True, allow_unused=True)
    scalars = GradNorm({'a': 1.0, 'b': 1.0}).backward(losses, list(model.shared_parameters()))
    for t in heads:
        torch.testing.assert_close(scalars[f'gradnorm/grad_norm/{t}'], norms[t])
    for (name, param), grad in zip(named.items(), total):  # first step: weights 1, so the plain sum's gradient
        torch.testing.assert_close(param.grad, grad, msg=name)


# ------------------------------------------------------------------------------------------------ building, errors

def test_registry_builds_modules_with_their_param_group():
    weights = {'a': 1.0, 'b': 2.0}
    uw = AGGREGATORS.build(dict(type='UncertaintyWeighting'), default_args=dict(loss_weights=weights))
    gn = AGGREGATORS.build(dict(type='GradNorm', alpha=0.5, lr_weights=0.025), default_args=dict(loss_weights=weights))
    for agg in (uw, gn):
        assert isinstance(agg, nn.Module) and isinstance(agg, Aggregator)
        assert agg.param_group()['params'] == list(agg.parameters()) and agg.param_group()['weight_decay'] == 0.0
    assert uw.supports_accumulation and not gn.supports_accumulation
    assert 'lr' not in uw.param_group() and gn.param_group()['lr'] == 0.025
    assert sorted(gn.state_dict()) == ['initial_losses', 'task_weights.a', 'task_weights.b']
    assert gn.alpha == 0.5 and gn.lr_weights == 0.025


@pytest.mark.parametrize('build, message', [
    (lambda: UncertaintyWeighting({}), 'at least one task'),
    (lambda: UncertaintyWeighting({'seg.city': 1.0}), r"without \".\", got \['seg.city'\]"),
    (lambda: UncertaintyWeighting({'a': 1.0}, init_log_variance=float('inf')), 'init_log_variance must be finite'),
    (lambda: GradNorm({'a': 1.0}, alpha=-1.0), 'alpha must be >= 0, got -1.0'),
    (lambda: GradNorm({'a': 1.0}, lr_weights=0.0), 'lr_weights must be positive'),
    (lambda: GradNorm({'a': 1.0}, layer=''), 'layer must be a non-empty'),
])
def test_bad_arguments_are_named(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize('cls', [UncertaintyWeighting, GradNorm])
def test_bad_losses_are_named(cls):
    model, agg = Tiny(), cls({'a': 1.0, 'b': 1.0})
    with pytest.raises(KeyError, match=r"without a loss weight: \['z'\]"):
        agg.backward({'z': torch.tensor(1.0)}, [model.shared.weight])
    with pytest.raises(ValueError, match=r"task 'b' must be a scalar, got shape \(2,\)"):
        agg.backward({'b': torch.ones(2)}, [model.shared.weight])
    with pytest.raises(ValueError, match='scale must be positive, got 0'):
        agg.backward(model.losses({'a': 1.0}), [model.shared.weight], scale=0)


def test_gradnorm_layer_errors():
    model = Stacked()
    agg = GradNorm({'a': 1.0, 'b': 1.0}, layer='lin2')
    with pytest.raises(RuntimeError, match=r'call attach\(model.backbone, device\)'):
        agg.backward(model.losses(), model.shared())
    with pytest.raises(ValueError, match="layer='lin3' matches no shared parameter name"):
        GradNorm({'a': 1.0}, layer='lin3').bind_names(model.named_parameters())
    with pytest.raises(ValueError, match=r"losses of every task of the step \['a', 'b'\]"):
        GradNorm({'a': 1.0, 'b': 1.0}).backward(model.losses(), [model.lin1.bias, model.token])
