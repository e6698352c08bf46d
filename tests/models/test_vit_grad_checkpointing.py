"""Activation checkpointing of the ViT and Swin wrappers: the same outputs and gradients (float64) as without it,
the blocks really run twice (forward, then again in the backward), and MoE blocks rerun for their own task."""
import pytest
import torch

from mtvision.models.backbones import Swin, ViT
from mtvision.models.moe import moe_layers, routing_task

TASKS = ['cls', 'seg']


def tiny_vit(**kwargs) -> ViT:
    torch.manual_seed(0)
    return ViT('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2,
               out_indices=(0, 2), **kwargs).double().train()


def tiny_swin(**kwargs) -> Swin:
    torch.manual_seed(0)
    return Swin('swin_tiny_patch4_window7_224', img_size=32, window_size=4, embed_dim=16, depths=(2, 2),
                num_heads=(1, 2), out_indices=(0, 1), mask_patch_size=8, **kwargs).double().train()


def blocks_of(backbone) -> list:
    return backbone.mlp_blocks()


def run(backbone, checkpointed: bool, mask_ratio=None, task=None):
    """(outputs, parameter gradients, forward calls per block) of one forward and backward with fixed weights,
    images, mask and loss."""
    backbone.set_grad_checkpointing(checkpointed)
    backbone.zero_grad()
    calls = [0] * len(blocks_of(backbone))
    # a pre-hook: the recompute stops as soon as it has rebuilt what the backward needs, so post-hooks may not run
    hooks = [block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, block in enumerate(blocks_of(backbone))]
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    if task is None:
        output = backbone(images, mask_ratio=mask_ratio)
    else:
        with routing_task(backbone, task):
            output = backbone(images, mask_ratio=mask_ratio)
    # a loss that weighs every output element differently, so any wrong gradient shows
    outputs = [output.tokens, *output.maps]
    loss = sum((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() for y in outputs)
    loss.backward()
    for hook in hooks:
        hook.remove()
    grads = {name: p.grad.clone() for name, p in backbone.named_parameters() if p.grad is not None}
    return [y.detach() for y in outputs], grads, calls


def assert_same_run(plain, checkpointed):
    (outputs, grads, _), (outputs_ckpt, grads_ckpt, _) = plain, checkpointed
    assert len(outputs) == len(outputs_ckpt)
    for y, y_ckpt in zip(outputs, outputs_ckpt):
        torch.testing.assert_close(y_ckpt, y, rtol=0, atol=1e-12)
    assert grads.keys() == grads_ckpt.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize('make, mask_ratio', [(tiny_vit, None), (tiny_vit, 0.5), (tiny_swin, None),
                                              (tiny_swin, 0.5)], ids=['vit', 'vit-mae', 'swin', 'swin-simmim'])
def test_checkpointing_keeps_outputs_and_gradients_and_reruns_every_block(make, mask_ratio):
    # drop-path on: the rerun must replay the forward's random draws
    backbone = make(drop_path_rate=0.2)
    plain = run(backbone, False, mask_ratio)
    checkpointed = run(backbone, True, mask_ratio)
    assert_same_run(plain, checkpointed)
    assert plain[2] == [1] * len(blocks_of(backbone))
    assert checkpointed[2] == [2] * len(blocks_of(backbone))  # forward, then the backward's recompute


def test_timm_model_flag_stays_off_so_its_own_checkpointing_never_runs():
    backbone = tiny_vit(grad_checkpointing=True)
    assert backbone.grad_checkpointing and not backbone.model.grad_checkpointing


def test_no_recompute_without_gradients():
    backbone = tiny_vit(grad_checkpointing=True)
    calls = []
    backbone.model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        backbone(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    assert calls == [1]


@pytest.mark.parametrize('make', [tiny_vit, tiny_swin], ids=['vit', 'swin'])
def test_moe_blocks_rerun_for_their_task_and_count_their_routing_once(make):
    # the backward (with its recompute) runs after routing_task has restored the layers' task to None
    backbone = make(moe=dict(blocks='all', num_experts=4, top_k=2, noise_std=1.0), tasks=TASKS)
    plain = run(backbone, False, task='seg')
    usage = [layer.usage.clone() for _, layer in moe_layers(backbone)]
    checkpointed = run(backbone, True, task='seg')
    assert_same_run(plain, checkpointed)
    assert checkpointed[2] == [2] * len(blocks_of(backbone))
    for (_, layer), before in zip(moe_layers(backbone), usage):
        assert layer.task is None
        torch.testing.assert_close(layer.usage, 2 * before)  # two forwards counted, not three
        # the forward's auxiliary losses, not the recompute's: still part of the forward graph
        assert layer.last_aux['balance'].grad_fn is not None


@pytest.mark.parametrize('batched', [False, True], ids=['per-task', 'vmapped'])
def test_per_task_gradients_of_gradient_surgery_through_checkpointed_moe_blocks(batched):
    # surgery differentiates each task's loss separately (autograd.grad, retain_graph or vmapped), all after the
    # task loop: every recompute must route for the task of its own forward
    backbone = tiny_vit(moe=dict(blocks='all', num_experts=4), tasks=TASKS)
    params = list(backbone.parameters())
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def task_gradients(checkpointed):
        backbone.set_grad_checkpointing(checkpointed)
        losses = []
        for task in TASKS:
            with routing_task(backbone, task):
                losses.append(backbone(images).tokens.square().sum())
        losses = torch.stack(losses)
        if batched:
            return torch.autograd.grad(losses, params, torch.eye(len(TASKS), dtype=losses.dtype),
                                       is_grads_batched=True, materialize_grads=True)
        per_task = [torch.autograd.grad(loss, params, retain_graph=True, materialize_grads=True) for loss in losses]
        return [torch.stack(grads) for grads in zip(*per_task)]

    for plain, checkpointed in zip(task_gradients(False), task_gradients(True)):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-10, atol=1e-12)
