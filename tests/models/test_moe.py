import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from mtvision.models.moe import (MoEMlp, auxiliary_losses, convert_blocks_to_moe, convert_to_moe, experts_used,
                                 load_balancing_loss, moe_layers, mutual_information_loss, mutual_information_terms,
                                 router_z_loss, routing_task)

TASKS = ['cls', 'seg']


def make_layer(seed: int = 0, dim: int = 16, hidden: int = 24, num_experts: int = 6, **kwargs) -> MoEMlp:
    torch.manual_seed(seed)
    layer = MoEMlp(dim, hidden, num_experts, TASKS, **kwargs)
    layer.task = 'seg'
    return layer


def tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def expert(layer: MoEMlp, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` written out as timm's Mlp computes it."""
    return F.gelu(x @ layer.w1[e] + layer.b1[e]) @ layer.w2[e] + layer.b2[e]


def outputs_and_grads(layer: MoEMlp, forward, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = forward(x)
    # a non-uniform upstream gradient, so that a wrong gate or token index shows in the gradients
    (out * torch.linspace(-1, 2, out.numel()).view_as(out)).sum().backward()
    grads = {'input': x.grad}
    grads.update({name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None})
    layer.zero_grad(set_to_none=True)
    return out.detach(), grads


# ------------------------------------------------------------------------------------------- batched vs naive
@pytest.mark.parametrize('router', ['per_task', 'shared'])
@pytest.mark.parametrize('top_k', [1, 2])
@pytest.mark.parametrize('capacity_factor', [None, 0.5])
def test_batched_dispatch_equals_the_expert_loop_in_outputs_and_gradients(router, top_k, capacity_factor):
    layer = make_layer(router=router, top_k=top_k, capacity_factor=capacity_factor)
    x = tokens(3, 20, 16)
    out, grads = outputs_and_grads(layer, layer, x)
    stats_batched = layer.pop_statistics()
    ref, ref_grads = outputs_and_grads(layer, layer.naive_forward, x)
    stats_naive = layer.pop_statistics()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    assert {'input', 'w1', 'b1', 'w2', 'b2'} <= grads.keys()
    assert ('routers.seg.weight' if router == 'per_task' else 'router.weight') in grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    for key in ('usage', 'dropped', 'assigned'):
        assert torch.equal(stats_batched[key], stats_naive[key]), key
    if capacity_factor is not None:  # the case must really drop assignments
        assert stats_batched['dropped'][1] > 0
    else:
        assert stats_batched['dropped'][1] == 0


def test_capacity_keeps_first_choices_before_second_choices_as_counted_by_hand():
    # dim = E = 4 and an identity router, so each token's logits are the token itself
    layer = make_layer(dim=4, num_experts=4, top_k=2, capacity_factor=0.5).eval()
    with torch.no_grad():
        layer.routers['seg'].weight.copy_(torch.eye(4))
        layer.routers['seg'].bias.zero_()
    x = torch.tensor([[3.0, 2.0, 0.0, 0.0],    # t0: expert 0, then 1
                      [3.0, 2.5, 0.0, 0.0],    # t1: expert 0, then 1
                      [2.0, 3.0, 0.0, 0.0],    # t2: expert 1, then 0
                      [2.0, 0.0, 3.0, 0.0]])   # t3: expert 2, then 0
    # capacity ceil(0.5 * 2 * 4 / 4) = 1. Expert 0 queue: t0, t1 (first choices), t2, t3 (second) -> keeps t0.
    # Expert 1 queue: t2 (first choice) ahead of t0, t1 (second choices) -> keeps t2. Expert 2 keeps t3.
    assert layer.capacity(4) == 1
    out = layer(x)
    stats = layer.pop_statistics()
    assert stats['assigned'].tolist() == [0, 8] and stats['dropped'].tolist() == [0, 5]
    assert stats['usage'][1].tolist() == [1.0, 1.0, 1.0, 0.0]
    def gate(a, b):  # softmax weight of logit a against b
        return 1 / (1 + math.exp(b - a))
    with torch.no_grad():
        expected = torch.stack([gate(3, 2) * expert(layer, 0, x[0]), torch.zeros(4),
                                gate(3, 2) * expert(layer, 1, x[2]), gate(3, 2) * expert(layer, 2, x[3])])
    torch.testing.assert_close(out, expected)


def test_usage_counts_every_kept_assignment_and_pop_zeroes_them():
    layer = make_layer(num_experts=5, top_k=2, capacity_factor=0.6)
    x = tokens(2, 25, 16)
    layer(x)
    layer.task = 'cls'
    layer(x[:1])
    stats = layer.pop_statistics()
    assert stats['tasks'] == TASKS
    assert stats['assigned'].tolist() == [25 * 2, 50 * 2]
    assert stats['dropped'].min() > 0
    torch.testing.assert_close(stats['usage'].sum(dim=1), (stats['assigned'] - stats['dropped']).double())
    # without capacity the counts are the top-k choices counted directly
    layer.capacity_factor = None
    layer(x)
    choices = layer.router_logits(x.reshape(-1, 16), 0).topk(2, dim=-1).indices
    expected = torch.bincount(choices.reshape(-1), minlength=5).double()
    assert torch.equal(layer.pop_statistics()['usage'][0], expected)
    after = layer.pop_statistics()
    assert after['usage'].sum() == 0 and after['dropped'].sum() == 0 and after['assigned'].sum() == 0


# ------------------------------------------------------------------------------------------------ aux losses
def test_balance_loss_is_one_when_balanced_and_num_experts_when_collapsed():
    uniform = torch.full((4, 4), 0.25)
    assert load_balancing_loss(uniform, torch.tensor([[0], [1], [2], [3]])).item() == pytest.approx(1.0)
    assert load_balancing_loss(uniform, torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])).item() == pytest.approx(1.0)
    collapsed = F.one_hot(torch.zeros(6, dtype=torch.long), 4).float()
    assert load_balancing_loss(collapsed, torch.zeros(6, 1, dtype=torch.long)).item() == pytest.approx(4.0)


def test_balance_loss_matches_a_hand_computation():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    index = torch.tensor([[0, 1], [1, 2]])
    # f = (1/4, 2/4, 1/4), P = (0.3, 0.45, 0.25): 3 * (0.075 + 0.225 + 0.0625)
    assert load_balancing_loss(probs, index).item() == pytest.approx(3 * 0.3625)
    with pytest.raises(ValueError, match=r'expert_index \[T, k\]'):
        load_balancing_loss(probs, torch.tensor([0, 1]))


def test_z_loss_matches_a_hand_computation():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, -1.0]])
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits.tolist()]
    assert router_z_loss(logits).item() == pytest.approx((lse[0] ** 2 + lse[1] ** 2) / 2, rel=1e-6)


def test_mutual_information_loss_matches_a_hand_computation():
    table = [[0.8, 0.2], [0.3, 0.7]]

    def minus_mi(p_task):
        p_expert = [sum(p_task[t] * table[t][e] for t in range(2)) for e in range(2)]
        return -sum(p_task[t] * table[t][e] * math.log(table[t][e] / p_expert[e]) for t in range(2) for e in range(2))

    assert mutual_information_loss(torch.tensor(table)).item() == pytest.approx(minus_mi([0.5, 0.5]), rel=1e-5)
    weighted = mutual_information_loss(torch.tensor(table), torch.tensor([1.0, 3.0]))
    assert weighted.item() == pytest.approx(minus_mi([0.25, 0.75]), rel=1e-5)
    assert mutual_information_loss(torch.eye(3)).item() == pytest.approx(-math.log(3), rel=1e-6)
    assert mutual_information_loss(torch.tensor([[0.2, 0.8]] * 3)).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match='task_weights'):
        mutual_information_loss(torch.tensor(table), torch.tensor([1.0, -1.0]))
    # per task: -P(t) KL(P(e|t) || P(e)), with P(e) = (0.55, 0.45) under uniform P(t)
    kl = [sum(p * math.log(p / q) for p, q in zip(row, (0.55, 0.45))) for row in table]
    terms = mutual_information_terms(torch.tensor(table))
    assert terms.tolist() == pytest.approx([-0.5 * kl[0], -0.5 * kl[1]], rel=1e-5)


def test_last_aux_is_the_losses_of_the_task_routing():
    layer = make_layer(num_experts=4, top_k=2)
    x = tokens(10, 16)
    layer(x)
    logits = layer.router_logits(x, 1)
    probs = logits.softmax(dim=-1)
    aux = layer.last_aux
    torch.testing.assert_close(aux['balance'], load_balancing_loss(probs, logits.topk(2).indices))
    torch.testing.assert_close(aux['z_loss'], router_z_loss(logits))
    torch.testing.assert_close(aux['probs'], probs.mean(dim=0))
    assert aux['probs'].requires_grad and aux['balance'].requires_grad
    assert auxiliary_losses(nn.Sequential(make_layer(), make_layer())) == {}  # no layer has run
    layer2 = make_layer(seed=3, num_experts=4, top_k=2)
    layer2(x)
    summed = auxiliary_losses(nn.Sequential(layer, layer2))
    torch.testing.assert_close(summed['balance'], aux['balance'] + layer2.last_aux['balance'])


def test_noise_changes_routing_only_in_training():
    layer = make_layer(num_experts=8, noise_std=2.0).eval()
    clean = make_layer(num_experts=8).eval()  # same seed, same weights
    x = tokens(40, 16)
    torch.testing.assert_close(layer(x), clean(x), rtol=0, atol=0)
    layer.train()
    torch.manual_seed(5)
    noisy = layer(x)
    assert not torch.allclose(noisy, clean(x))
    torch.manual_seed(5)
    torch.testing.assert_close(layer(x), noisy, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- task selection
def test_forward_without_or_with_an_unknown_task_names_the_known_tasks():
    layer = make_layer()
    layer.task = None
    with pytest.raises(ValueError, match=r"task is None.*\['cls', 'seg'\]"):
        layer(tokens(4, 16))
    layer.task = 'depth'
    with pytest.raises(ValueError, match=r"task is 'depth'.*\['cls', 'seg'\]"):
        layer(tokens(4, 16))


def test_routing_task_sets_every_layer_and_restores_the_previous_tasks():
    model = nn.Sequential(make_layer(), nn.Identity(), make_layer())
    model[0].task, model[2].task = 'seg', None
    with routing_task(model, 'cls'):
        assert [layer.task for _, layer in moe_layers(model)] == ['cls', 'cls']
        with routing_task(model, 'seg'):
            assert model[2].task == 'seg'
        assert model[2].task == 'cls'
    assert (model[0].task, model[2].task) == ('seg', None)
    with pytest.raises(RuntimeError), routing_task(model, 'cls'):
        raise RuntimeError
    assert (model[0].task, model[2].task) == ('seg', None)
    with pytest.raises(ValueError, match=r"does not route task 'depth'; its tasks are \['cls', 'seg'\]"):
        with routing_task(model, 'depth'):
            pass
    assert [name for name, _ in moe_layers(model)] == ['0', '2']


@pytest.mark.parametrize('kwargs, message', [
    (dict(top_k=7), 'top_k'), (dict(router='dense'), "router must be one of"),
    (dict(capacity_factor=0.0), 'capacity_factor'), (dict(noise_std=-1.0), 'noise_std'),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoEMlp(16, 24, 6, TASKS, **kwargs)
    with pytest.raises(ValueError, match='tasks must be distinct'):
        MoEMlp(16, 24, 6, ['cls', 'cls'])


# ------------------------------------------------------------------------------------ extraction, upcycling
@pytest.mark.parametrize('router', ['per_task', 'shared'])
def test_extracted_layer_equals_the_full_layer_on_its_task(router):
    layer = make_layer(num_experts=8, top_k=2, router=router).eval()
    bias = layer.routers['seg'].bias if router == 'per_task' else layer.router.bias
    with torch.no_grad():
        bias[[1, 4, 6]] = -100.0  # experts the task never selects
    x = tokens(4, 20, 16)
    full = layer(x)
    usage = layer.pop_statistics()['usage'][1]
    keep = experts_used(usage, threshold=0.0)
    assert keep.tolist() == [True, False, True, True, False, True, False, True]
    small = layer.extract('seg', keep)
    assert small.tasks == ('seg',) and small.num_experts == 5 and small.task == 'seg'
    assert torch.equal(small.w2, layer.w2[keep])
    # same choices; the outputs differ only by the rounding of a 5-row instead of an 8-row router matmul
    torch.testing.assert_close(small(x), full, rtol=1e-6, atol=1e-7)
    assert torch.equal(small.pop_statistics()['usage'][0], usage[keep])
    # dropping an expert the task does use changes its outputs
    keep[0] = False
    assert not torch.allclose(layer.extract('seg', keep)(x), full)
    with pytest.raises(ValueError, match=r"unknown task 'depth'"):
        layer.extract('depth', keep)


def test_experts_used_keeps_shares_above_the_threshold():
    usage = torch.tensor([50.0, 30.0, 15.0, 5.0, 0.0], dtype=torch.float64)
    assert experts_used(usage, 0.1).tolist() == [True, True, True, False, False]
    assert experts_used(usage, 0.0).tolist() == [True, True, True, True, False]
    with pytest.raises(ValueError, match='counts no assignment'):
        experts_used(torch.zeros(5), 0.0)


@pytest.mark.parametrize('router', ['per_task', 'shared'])
def test_upcycled_layer_computes_the_dense_mlp(router):
    torch.manual_seed(0)
    dense = Mlp(16, 40)
    layer = MoEMlp.from_dense(dense, num_experts=4, tasks=TASKS, top_k=2, router=router)
    layer.task = 'cls'
    x = tokens(2, 9, 16)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-6)
    assert layer.hidden_dim == 40 and torch.equal(layer.w1[3], dense.fc1.weight.t())
    with pytest.raises(ValueError, match='hidden_dim=32 differs from the dense MLP hidden width 40'):
        MoEMlp.from_dense(dense, num_experts=4, tasks=TASKS, hidden_dim=32)


# ----------------------------------------------------------------------------------------------- in models
def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                             num_classes=0)


def test_converted_vit_trains_the_experts_its_task_routes_to_and_no_other():
    vit = tiny_vit()
    convert_to_moe(vit.blocks, indices=range(0, len(vit.blocks), 2), num_experts=8, tasks=TASKS, top_k=2)
    (name, layer), = moe_layers(vit)
    assert name == 'blocks.0.mlp' and layer.w1.shape == (8, 32, 128)
    with torch.no_grad():
        layer.routers['cls'].bias[4:] = -100.0  # 'cls' never picks experts 4..7
    head = nn.Linear(32, 3)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 1])
    params = list(vit.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=1e-3)

    def loss_fn():
        with routing_task(vit, 'cls'):
            loss = F.cross_entropy(head(vit(images)), labels)
            return loss + 0.01 * auxiliary_losses(vit)['balance']

    loss = loss_fn()
    loss.backward()
    usage = layer.pop_statistics()['usage'][0]
    used = usage > 0
    assert used[:4].all() and not used[4:].any()
    grad_norm = layer.w1.grad.flatten(1).norm(dim=1)
    assert (grad_norm[used] > 0).all() and (grad_norm[~used] == 0).all()
    assert layer.routers['seg'].weight.grad is None  # the other task's router took no part
    optimizer.step()
    optimizer.zero_grad()
    assert loss_fn().item() < loss.item()


def test_convert_to_moe_upcycles_swin_blocks_without_changing_the_model():
    torch.manual_seed(0)
    swin = timm.create_model('swin_tiny_patch4_window7_224', img_size=32, patch_size=4, window_size=4,
                             embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=0).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = swin(images)
    blocks = [b for layer in swin.layers for b in layer.blocks]
    convert_to_moe(blocks, indices=[0, -1], num_experts=4, tasks=TASKS)
    assert [name for name, _ in moe_layers(swin)] == ['layers.0.blocks.0.mlp', 'layers.1.blocks.0.mlp']
    assert moe_layers(swin)[1][1].dim == 32
    with torch.no_grad(), routing_task(swin, 'seg'):
        torch.testing.assert_close(swin(images), dense, rtol=1e-4, atol=1e-5)
    with pytest.raises(IndexError, match=r'block indices \[2\] out of range for 2 blocks'):
        convert_to_moe(blocks, indices=[2], num_experts=4, tasks=TASKS)
    with pytest.raises(TypeError, match='block 0 has no dense timm Mlp'):
        convert_to_moe(blocks, indices=[0], num_experts=4, tasks=TASKS)


def test_convert_without_upcycling_uses_fresh_experts_of_the_requested_width():
    vit = tiny_vit()
    convert_to_moe(vit.blocks, indices=[1], num_experts=4, tasks=TASKS, hidden_dim=48, upcycle=False)
    layer = vit.blocks[1].mlp
    assert isinstance(layer, MoEMlp) and layer.w1.shape == (4, 32, 48)
    assert not torch.equal(layer.w1[0], layer.w1[1])
    with pytest.raises(ValueError, match='hidden_dim=48 differs'):
        convert_to_moe(vit.blocks, indices=[0], num_experts=4, tasks=TASKS, hidden_dim=48)


def test_router_runs_in_float32_under_autocast():
    layer = make_layer(num_experts=8)
    x = tokens(30, 16)
    reference = layer.router_logits(x, 1)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits = layer.router_logits(x, 1)
        out = layer(x)
    assert logits.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert torch.equal(logits, reference)
    torch.testing.assert_close(layer.last_aux['z_loss'], router_z_loss(reference), rtol=0, atol=0)


@pytest.mark.parametrize('router', ['per_task', 'shared'])
def test_no_weight_decay_names_the_two_dimensional_biases(router):
    layer = make_layer(router=router)
    names = layer.no_weight_decay()
    shapes = {name: p.shape for name, p in layer.named_parameters()}
    assert names <= shapes.keys() and {'b1', 'b2'} <= names
    assert ('task_embed.weight' in names) == (router == 'shared')


def test_moe_config_dict_converts_every_other_block_and_names_bad_keys():
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2,
                            num_classes=0)
    convert_blocks_to_moe(vit.blocks, dict(blocks='every_other', num_experts=4, top_k=1, router='shared'), TASKS)
    assert [name for name, _ in moe_layers(vit)] == ['blocks.1.mlp', 'blocks.3.mlp']
    layer = vit.blocks[3].mlp
    assert (layer.num_experts, layer.top_k, layer.router_type, layer.tasks) == (4, 1, 'shared', tuple(TASKS))
    with pytest.raises(ValueError, match=r"moe: unknown keys \['experts'\]"):
        convert_blocks_to_moe(vit.blocks, dict(experts=4), TASKS)
    with pytest.raises(ValueError, match='moe.blocks must be'):
        convert_blocks_to_moe(vit.blocks, dict(blocks='odd', num_experts=4), TASKS)
    with pytest.raises(ValueError, match='need the task names'):
        convert_blocks_to_moe(vit.blocks, dict(blocks=[0], num_experts=4), [])


def test_a_layer_can_be_deep_copied_after_a_forward():
    layer = make_layer()
    x = tokens(5, 16)
    out = layer(x)
    twin = copy.deepcopy(layer)
    assert twin.last_aux is None and layer.last_aux is not None
    assert torch.equal(twin(x), out) and torch.equal(twin.usage, 2 * layer.usage)
