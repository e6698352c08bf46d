import pytest
import torch

from mtvision.engine import Trainer, read_weights
from mtvision.models.multitask import MultiTaskModel
from mtvision.optim import AlignedMTL, PCGrad, WeightedSum
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
    trainer.model.loss = lambda task, batch: {k: v * (float('inf') if trainer.step == 1 and task == 'cls' else 1)
                                              for k, v in original(task, batch).items()}
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
                                        dict(type='PCGrad'), dict(type='AlignedMTL', scale_mode='median')],
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
