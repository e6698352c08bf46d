import pytest
import torch

from mtvision.engine import Trainer

from mtvision.checkpoint import read_weights
from mtvision.models.multitask import MultiTaskModel
from mtvision.optim import AlignedMTL, AlignedMTLUB, PCGrad, WeightedSum
from mtvision.optim.gradient_surgery import aligned_mtl_weights, pcgrad_orders, pcgrad_weights

BACKBONE = dict(type='ViT', model_name='vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=2,
                num_heads=2)
HEADS = {'a': dict(type='ClassificationHead', num_classes=3), 'b': dict(type='ClassificationHead', num_classes=4,
                                                                        feature='avg'),
         'c': dict(type='ClassificationHead', num_classes=2)}


def losses_of(model: MultiTaskModel, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, 32, 32, generator=generator)
    return {task: model.loss(task, dict(images=images, targets=torch.randint(0, 2, (4,), generator=generator)))[
        'loss_cls'] for task in model.heads}


def reference_update(model, weights_fn):
    """Per-task gradients by hand (three separate backward passes), then the weighted combination."""
    grads = {}
    for task in model.heads:
        model.zero_grad(set_to_none=True)
        losses_of(model)[task].backward()
        grads[task] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    shared = [name for name, _ in model.named_parameters() if name.startswith('backbone.')]
    flat = torch.stack([torch.cat([grads[t][n].flatten() for n in shared]) for t in model.heads]).double()
    weights = weights_fn(flat @ flat.T)
    expected = {}
    offset = 0
    for name in shared:
        numel = grads['a'][name].numel()
        expected[name] = (weights @ flat[:, offset:offset + numel]).view_as(grads['a'][name]).float()
        offset += numel
    for task in model.heads:  # heads: their own task's gradient
        expected.update({n: g for n, g in grads[task].items() if n.startswith(f'heads.{task}.')})
    return expected, weights


@pytest.mark.parametrize('method', ['pcgrad', 'aligned_mtl'])
def test_surgery_aggregators_match_per_task_gradients_combined_by_hand(method):
    torch.manual_seed(0)
    model = MultiTaskModel(BACKBONE, HEADS)
    weights = {task: 1.0 for task in HEADS}
    if method == 'pcgrad':
        orders = pcgrad_orders(3, torch.Generator().manual_seed(7))
        expected, w = reference_update(model, lambda gram: pcgrad_weights(gram, orders))
        aggregator = PCGrad(weights, seed=7)
    else:
        expected, w = reference_update(model, lambda gram: aligned_mtl_weights(gram, tolerance=3 * 1.1920929e-07))
        aggregator = AlignedMTL(weights)
    model.zero_grad(set_to_none=True)
    scalars = aggregator.backward(losses_of(model), list(model.shared_parameters()),
                                  {task: list(model.task_parameters(task)) for task in HEADS})
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert scalars['surgery/weight/b'] == pytest.approx(float(w[1]))
    assert -1 <= scalars['surgery/cosine/a-c'] <= 1 and scalars['surgery/rank'] == 3


def test_a_router_only_one_task_reaches_gets_that_tasks_gradient_not_the_surgery():
    torch.manual_seed(0)
    backbone = dict(BACKBONE, moe=dict(blocks=[1], num_experts=4, top_k=2, router='per_task'))
    model = MultiTaskModel(backbone, HEADS)
    losses = losses_of(model)
    router = model.backbone.model.blocks[1].mlp.routers['b']
    expected = torch.autograd.grad(losses['b'], router.weight, retain_graph=True)[0]
    PCGrad({task: 1.0 for task in HEADS}).backward(losses, list(model.shared_parameters()),
                                                   {task: list(model.task_parameters(task)) for task in HEADS})
    torch.testing.assert_close(router.weight.grad, expected)


def test_non_finite_gradients_give_nan_weights_and_the_scaler_skips(tiny_config, tmp_path):
    cfg = tiny_config(**{'aggregator': dict(type='AlignedMTL'), 'optim_wrapper.type': 'AmpOptimWrapper',
                         'optim_wrapper.dtype': 'float16', 'optim_wrapper.loss_scale': dict(init_scale=1024.0),
                         'train_cfg.max_iters': 2, 'checkpoint_cfg.interval': 1, 'checkpoint_cfg.max_keep': 5})
    cfg.tasks = {name: cfg.tasks[name] for name in ('cls', 'depth')}
    trainer = Trainer(cfg, tmp_path, validate=False)
    original = trainer.model.loss
    trainer.model.loss = lambda task, batch, normalizer=None: {
        k: v * (float('inf') if trainer.step == 1 and task == 'cls' else 1)
        for k, v in original(task, batch, normalizer).items()}
    trainer.train()
    first, second = read_weights(tmp_path / 'iter_1'), read_weights(tmp_path / 'iter_2')
    assert all(torch.equal(first[k], second[k]) for k in first) and trainer.skipped_steps == 1


def test_pcgrad_resumes_with_the_same_task_orders(tiny_config, tmp_path):
    options = {'aggregator': dict(type='PCGrad', seed=3), 'train_cfg.max_iters': 4, 'checkpoint_cfg.interval': 2,
               'checkpoint_cfg.max_keep': 5}
    Trainer(tiny_config(**options), tmp_path / 'full', validate=False).train()
    Trainer(tiny_config(**options), tmp_path / 'resumed', resume=str(tmp_path / 'full' / 'iter_2'),
            validate=False).train()
    full, resumed = read_weights(tmp_path / 'full'), read_weights(tmp_path / 'resumed')
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_surgery_refuses_gradient_accumulation(tiny_config, tmp_path):
    with pytest.raises(ValueError, match='PCGrad does not support train_cfg.accumulate_steps=2'):
        Trainer(tiny_config(**{'aggregator': dict(type='PCGrad'), 'train_cfg.accumulate_steps': 2}), tmp_path)
    assert WeightedSum.supports_accumulation


@pytest.mark.parametrize('aggregator', [dict(type='UncertaintyWeighting'), dict(type='GradNorm', alpha=1.5),
                                        dict(type='PCGrad'), dict(type='AlignedMTL', scale_mode='median'),
                                        dict(type='AlignedMTLUB'), dict(type='PCGrad', gram_chunks=2)],
                         ids=lambda cfg: cfg['type'])
def test_every_aggregator_trains_the_quick_start_from_the_config_and_resumes_exactly(tiny_config, tmp_path,
                                                                                     aggregator):
    options = {'aggregator': aggregator, 'train_cfg.max_iters': 4, 'checkpoint_cfg.interval': 2,
               'checkpoint_cfg.max_keep': 5}
    full = Trainer(tiny_config(**options), tmp_path / 'full', validate=False)
    initial = {k: v.clone() for k, v in full.aggregator.state_dict().items()} if full.learned_weights else None
    full.train()
    Trainer(tiny_config(**options), tmp_path / 'resumed', resume=str(tmp_path / 'full' / 'iter_2'),
            validate=False).train()
    first, second = read_weights(tmp_path / 'full'), read_weights(tmp_path / 'resumed')
    assert all(torch.equal(first[k], second[k]) for k in first)
    if initial is not None:  # the learned loss weights moved, and are part of the checkpoint
        state = torch.load(tmp_path / 'full' / 'iter_4' / 'training_state.pth', weights_only=True)['aggregator']
        assert any(not torch.equal(state[k], initial[k]) for k in initial if initial[k].is_floating_point()
                   and torch.isfinite(initial[k]).all())


def loss_weights_of(model) -> dict:
    return {task: 1.0 for task in model.heads}


def surgery_gradients(model, aggregator) -> dict:
    model.zero_grad(set_to_none=True)
    with model.capturing_features() as features:
        losses = losses_of(model)
    aggregator.backward(losses, list(model.shared_parameters()),
                        {task: list(model.task_parameters(task)) for task in model.heads}, features=features)
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('options', [dict(gram_chunks=3), dict(gram_chunks=1), dict(per_task_grads='batched')],
                         ids=['gram-3-chunks', 'gram-1-chunk', 'batched'])
@pytest.mark.parametrize('method', [PCGrad, AlignedMTL])
def test_gram_mode_and_batched_gradients_give_the_materialised_update(method, options):
    torch.manual_seed(0)
    backbone = dict(BACKBONE, moe=dict(blocks=[1], num_experts=4, top_k=2, router='per_task'))
    model = MultiTaskModel(backbone, HEADS)
    expected = surgery_gradients(model, method(loss_weights_of(model)))
    got = surgery_gradients(model, method(loss_weights_of(model), **options))
    assert got.keys() == expected.keys() and any('routers' in name for name in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


class SharedLinear(torch.nn.Module):
    """One shared linear layer z = W x + b on ONE input for every task, a linear head per task: the parameter
    gradients are g_t x^T (and g_t), so K_param = (||x||^2 + 1) K_feature and both levels give the same weights."""

    def __init__(self, tasks: int):
        super().__init__()
        self.shared = torch.nn.Linear(5, 8)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(tasks))
        for head in self.heads[1:]:  # one head's weights for all: targets of opposite sign then conflict
            head.load_state_dict(self.heads[0].state_dict())

    def losses(self, x, targets):
        z = self.shared(x)
        return z, {f't{i}': ((head(z) - target) ** 2).sum() for i, (head, target) in
                   enumerate(zip(self.heads, targets))}


@pytest.mark.parametrize('method', [PCGrad, AlignedMTL])
@pytest.mark.parametrize('num_tasks', [2, 4])
def test_feature_level_equals_parameter_level_on_one_shared_linear_layer(method, num_tasks):
    torch.manual_seed(num_tasks)
    model = SharedLinear(num_tasks).double()  # float64: the two levels' Gram matrices differ by rounding only
    x, base = torch.randn(1, 5, dtype=torch.float64), torch.randn(1, 8, dtype=torch.float64) * 3
    targets = torch.stack([(-1) ** i * base + torch.randn(1, 8, dtype=torch.float64) for i in range(num_tasks)])
    grads = {}
    for level in ('parameter', 'feature'):
        model.zero_grad(set_to_none=True)
        z, losses = model.losses(x, targets)
        aggregator = method({t: 1.0 for t in losses}, level=level)
        scalars = aggregator.backward(losses, list(model.shared.parameters()),
                                      {f't{i}': list(head.parameters()) for i, head in enumerate(model.heads)},
                                      features={t: z for t in losses})
        grads[level] = ([p.grad.clone() for p in model.parameters()],
                        [scalars[f'surgery/weight/{t}'] for t in losses])
    for got, expected in zip(grads['feature'][0], grads['parameter'][0]):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert grads['feature'][1] == pytest.approx(grads['parameter'][1], rel=1e-9)
    assert any(w != pytest.approx(1.0) for w in grads['feature'][1])  # the surgery did something


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_aligned_mtl_ub_on_disjoint_images_equalises_the_representation_gradient_norms(dtype):
    """Tasks on their own images: K is diagonal, so the weights are sqrt(min_t ||g_t|| ^ 2 / ||g_t|| ^ 2); the same
    under bf16 autocast (the backbone's products in bf16, its final LayerNorm and the losses in fp32)."""
    torch.manual_seed(0)
    model = MultiTaskModel(BACKBONE, HEADS)
    with model.capturing_features() as features, torch.autocast('cpu', dtype=torch.bfloat16,
                                                                enabled=dtype == torch.bfloat16):
        losses = {task: loss.float() for task, loss in losses_of(model).items()}
    norms = []
    for task in HEADS:
        grads = torch.autograd.grad(losses[task], features[task].representation(), retain_graph=True,
                                    allow_unused=True)
        norms.append(torch.cat([g.double().flatten() for g in grads if g is not None]).norm())
    norms = torch.stack(norms)
    weights = norms.min() / norms
    shared = list(model.shared_parameters())
    expected = torch.autograd.grad(sum(w.float() * losses[t] for w, t in zip(weights, HEADS)), shared,
                                   retain_graph=True)
    heads = {t: torch.autograd.grad(losses[t], list(model.task_parameters(t)), retain_graph=True) for t in HEADS}
    model.zero_grad(set_to_none=True)
    scalars = AlignedMTLUB(loss_weights_of(model)).backward(
        losses, shared, {t: list(model.task_parameters(t)) for t in HEADS}, features=features)
    for param, grad in zip(shared, expected):
        torch.testing.assert_close(param.grad, grad, rtol=1e-4, atol=1e-6)
    for task in HEADS:
        for param, grad in zip(model.task_parameters(task), heads[task]):
            torch.testing.assert_close(param.grad, grad)
    assert [scalars[f'surgery/weight/{t}'] for t in HEADS] == pytest.approx(weights.tolist())
    assert scalars['surgery/cosine/a-b'] == 0.0 and scalars['surgery/rank'] == 3


def test_feature_level_needs_every_tasks_representation():
    torch.manual_seed(0)
    model = MultiTaskModel(BACKBONE, HEADS)
    with model.capturing_features() as features:
        losses = losses_of(model)
    del features['b']
    with pytest.raises(ValueError, match=r"needs the shared representation of every task of the step; missing "
                                         r"for \['b'\]"):
        AlignedMTLUB(loss_weights_of(model)).backward(losses, list(model.shared_parameters()), features=features)
    with pytest.raises(ValueError, match="gram_chunks and per_task_grads apply to level='parameter' only"):
        PCGrad({'a': 1.0}, level='feature', gram_chunks=2)
    with pytest.raises(ValueError, match="gram_chunks must be None"):
        PCGrad({'a': 1.0}, gram_chunks=0)
