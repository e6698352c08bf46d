"""DINO / iBOT self-distillation: the losses and the centre against numpy, the teacher outside the gradient, multi-crop
batches, the masked ViT forward, and 2 processes against 1 on the global batch."""
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtvision.data.collate import Sample, collate_crops
from mtvision.data.prefetch import Normalization, to_device
from mtvision.data.transforms import MultiCrop
from mtvision.models.heads.dino import DINOHead, masked_token_loss, sinkhorn_knopp
from mtvision.models.multitask import MultiTaskModel

VIT = dict(type='ViT', model_name='vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=2,
           num_heads=2, dynamic_img_size=True)
HEAD = dict(type='DINOHead', out_dim=12, hidden_dim=24, bottleneck_dim=8)


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def head_outputs(batch: int, prototypes: int, local_crops: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return dict(student_logits=torch.randn(2 * batch, prototypes, generator=generator),
                local_logits=torch.randn(local_crops * batch, prototypes, generator=generator),
                teacher_logits=torch.randn(2 * batch, prototypes, generator=generator))


def test_dino_loss_is_the_cross_entropy_of_centred_sharpened_teacher_and_student_over_other_crops():
    head = DINOHead(embed_dim=8, out_dim=5, hidden_dim=8, bottleneck_dim=4, student_temperature=0.1,
                    teacher_temperature=0.07, center_momentum=0.8).train()
    head.center.copy_(torch.linspace(-0.3, 0.4, 5))
    outputs = head_outputs(batch=3, prototypes=5, local_crops=2)
    center = head.center.numpy().copy()
    loss = head.loss(outputs)['loss_dino']

    teacher = outputs['teacher_logits'].numpy().reshape(2, 3, 5)
    student = np.concatenate([outputs['student_logits'].numpy(), outputs['local_logits'].numpy()]).reshape(4, 3, 5)
    targets = np_softmax((teacher - center) / 0.07)
    log_probs = np.log(np_softmax(student / 0.1))
    pairs = [-(targets[t] * log_probs[s]).sum(-1).mean() for t in range(2) for s in range(4) if s != t]
    assert len(pairs) == 6
    np.testing.assert_allclose(float(loss), np.mean(pairs), rtol=1e-5)
    # the centre moved by its EMA formula, over both global crops' rows, after the loss used the old one
    expected_center = 0.8 * center + 0.2 * teacher.reshape(6, 5).mean(axis=0)
    np.testing.assert_allclose(head.center.numpy(), expected_center, rtol=1e-6)


def test_the_centre_stays_in_evaluation_and_the_teacher_temperature_warms_up_linearly():
    head = DINOHead(embed_dim=8, out_dim=5, hidden_dim=8, bottleneck_dim=4, teacher_temperature=0.07,
                    warmup_teacher_temperature=0.04, warmup_teacher_temperature_iters=30).eval()
    head.loss(head_outputs(batch=2, prototypes=5, local_crops=0))
    assert not head.center.any()
    assert [head.teacher_temperature_at(step) for step in (0, 15, 30, 500)] == pytest.approx([0.04, 0.055, 0.07, 0.07])


def test_sinkhorn_knopp_equals_a_numpy_reference_and_balances_the_prototypes():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    targets = sinkhorn_knopp(logits, temperature=0.5, iterations=3)
    q = np.exp(logits.numpy().astype(np.float64) / 0.5).T
    q /= q.sum()
    for _ in range(3):
        q /= q.sum(axis=1, keepdims=True) * 4
        q /= q.sum(axis=0, keepdims=True) * 6
    np.testing.assert_allclose(targets.numpy(), (q * 6).T, rtol=1e-5)
    np.testing.assert_allclose(targets.sum(dim=1).numpy(), np.ones(6), rtol=1e-5)


def test_ibot_loss_averages_each_images_masked_patches_then_divides_by_all_images():
    generator = torch.Generator().manual_seed(1)
    student, teacher_logits = torch.randn(5, 7, generator=generator), torch.randn(5, 7, generator=generator)
    teacher = torch.softmax(teacher_logits / 0.05, dim=-1)
    image_index = torch.tensor([0, 0, 0, 2, 2])  # image 1 has no masked patch, image 3 neither
    loss = masked_token_loss(student, teacher, image_index, num_images=4, temperature=0.1)
    per_patch = -(teacher.numpy() * np.log(np_softmax(student.numpy() / 0.1))).sum(-1)
    np.testing.assert_allclose(float(loss), (per_patch[:3].mean() + per_patch[3:].mean()) / 4, rtol=1e-5)


def dino_model(**head_options) -> MultiTaskModel:
    torch.manual_seed(0)
    return MultiTaskModel(VIT, dict(ssl=dict(HEAD, **head_options)))


def test_the_teacher_gets_no_gradient_and_the_student_and_mask_token_do():
    model = dino_model(ibot=dict(mask_probability=1.0), momentum=0.9).train()
    images, local = torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 16)
    terms = model.loss('ssl', dict(images=images, local_images=local, targets=None))
    assert set(terms) == {'loss_dino', 'loss_ibot'}
    sum(terms.values()).backward()
    head = model.heads['ssl']
    teachers = [*model.momentum_backbones.parameters(), *head.teacher.parameters()]
    assert teachers and all(p.grad is None for p in teachers)
    students = [*model.backbone.parameters(), *head.student.parameters()]
    assert all(p.grad is not None for p in students if p.requires_grad)
    assert head.mask_token.grad is not None and head.mask_token.grad.abs().sum() > 0

    # the teacher follows the student by EMA
    before = {name: p.clone() for name, p in head.teacher.named_parameters()}
    with torch.no_grad():
        for p in head.student.parameters():
            p.add_(1.0)
    model.update_momentum(['ssl'], step=0, max_steps=10)
    for name, p in head.teacher.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[name] + 0.1 * dict(head.student.named_parameters())[name])


def test_the_prototypes_are_frozen_for_the_first_iterations():
    model = dino_model(freeze_last_layer_iters=3).train()
    batch = dict(images=torch.randn(4, 3, 32, 32), targets=None)
    for step, frozen in [(2, True), (3, False)]:
        model.zero_grad(set_to_none=True)
        model.start_step(step, 10)
        sum(model.loss('ssl', batch).values()).backward()
        assert (model.heads['ssl'].student.prototypes.grad is None) == frozen
        assert model.heads['ssl'].student.mlp[0].weight.grad is not None


def test_a_patch_mask_replaces_exactly_the_masked_patch_embeddings_by_the_token():
    model = dino_model(ibot=dict())
    backbone = model.backbone.eval()
    images, token = torch.randn(2, 3, 32, 32), torch.randn(32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 5, 6]] = mask[1, 15] = True
    plain = backbone(images)
    torch.testing.assert_close(backbone(images, patch_mask=torch.zeros_like(mask), mask_token=token).tokens,
                               plain.tokens)

    def replace(module, inputs, output):  # the same replacement, written on timm's patch embedding output
        flat = output.reshape(2, 16, 32).clone()
        flat[mask] = token
        return flat.reshape(output.shape)
    hook = backbone.model.patch_embed.register_forward_hook(replace)
    try:
        expected = backbone(images)
    finally:
        hook.remove()
    masked = backbone(images, patch_mask=mask, mask_token=token)
    torch.testing.assert_close(masked.tokens, expected.tokens)
    assert torch.equal(masked.mask, mask.float()) and not torch.allclose(masked.tokens, plain.tokens)


def test_ibot_masks_the_share_of_crops_and_patches_it_is_told():
    head = DINOHead(embed_dim=8, out_dim=5, hidden_dim=8, bottleneck_dim=4,
                    ibot=dict(mask_probability=0.5, mask_ratio=(0.2, 0.4)))
    torch.manual_seed(0)
    mask = head.sample_patch_mask(rows=8, num_patches=50, device=torch.device('cpu'))
    per_row = mask.sum(dim=1)
    assert (per_row > 0).sum() == 4
    assert all(10 <= count <= 20 for count in per_row[per_row > 0].tolist())
    assert DINOHead(embed_dim=8, out_dim=5, hidden_dim=8, bottleneck_dim=4).sample_patch_mask(
        8, 50, torch.device('cpu')) is None


def test_multi_crop_batches_hold_the_global_and_local_crops_view_major_and_normalise_both():
    crops = MultiCrop(global_pipeline=[dict(type='Resize', size=8)], local_pipeline=[dict(type='Resize', size=4)],
                      num_local_crops=3)
    images = [torch.full((3, 16, 16), 10 * i, dtype=torch.uint8) for i in range(2)]
    batch = collate_crops([Sample(crops(image), None, f'img{i}.png') for i, image in enumerate(images)])
    assert batch['images'].shape == (4, 3, 8, 8) and batch['local_images'].shape == (6, 3, 4, 4)
    # view-major: crop v of image i at v * B + i
    assert batch['images'][:, 0, 0, 0].tolist() == [0, 10, 0, 10]
    assert batch['local_images'][:, 0, 0, 0].tolist() == [0, 10] * 3
    moved = to_device(batch, torch.device('cpu'), Normalization((0.5,) * 3, (0.25,) * 3))
    for key in ('images', 'local_images'):
        torch.testing.assert_close(moved[key], (batch[key].float() / 255 - 0.5) / 0.25)
    with pytest.raises(TypeError, match='MultiCrop'):
        collate_crops([Sample(images[0], None)])
    with pytest.raises(ValueError, match='local_pipeline exactly when num_local_crops > 0'):
        MultiCrop(global_pipeline=[dict(type='Resize', size=8)], num_local_crops=2)


WORLD_SIZE, BATCH, PROTOTYPES = 2, 3, 6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def rank_rows(outputs: dict, rank: int, world: int) -> dict:
    """This rank's images of global-batch outputs: each crop's block of rows, view-major, cut by rank."""
    local = {}
    for key, value in outputs.items():
        views = value.reshape(-1, world * BATCH, value.shape[-1])
        local[key] = views[:, rank * BATCH:(rank + 1) * BATCH].reshape(-1, value.shape[-1])
    return local


def losses_and_centres(outputs: dict, rank: int, world: int) -> dict:
    results = {}
    for centering in ('center', 'sinkhorn_knopp'):
        torch.manual_seed(0)
        head = DINOHead(embed_dim=8, out_dim=PROTOTYPES, hidden_dim=8, bottleneck_dim=4, centering=centering).train()
        head.center.normal_()
        results[centering] = dict(loss=head.loss(rank_rows(outputs, rank, world))['loss_dino'].detach(),
                                  center=head.center.clone())
    return results


def centre_rank(rank: int, port: int, out_dir) -> None:
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=WORLD_SIZE)
    try:
        outputs = head_outputs(WORLD_SIZE * BATCH, PROTOTYPES, local_crops=2)
        torch.save(losses_and_centres(outputs, rank, WORLD_SIZE), out_dir / f'dino{rank}.pt')
    finally:
        dist.destroy_process_group()


def test_two_processes_give_one_process_centre_and_loss_on_the_global_batch(tmp_path):
    mp.spawn(centre_rank, args=(free_port(), tmp_path), nprocs=WORLD_SIZE, join=True)
    single = losses_and_centres(head_outputs(WORLD_SIZE * BATCH, PROTOTYPES, local_crops=2), 0, 1)
    ranks = [torch.load(tmp_path / f'dino{rank}.pt', weights_only=True) for rank in range(WORLD_SIZE)]
    for centering in ('center', 'sinkhorn_knopp'):
        # each rank's loss is the mean over its images: the ranks' mean is the global batch's loss
        torch.testing.assert_close(sum(r[centering]['loss'] for r in ranks) / WORLD_SIZE, single[centering]['loss'])
        for r in ranks:
            torch.testing.assert_close(r[centering]['center'], single[centering]['center'])
    assert not torch.equal(ranks[0]['center']['loss'], ranks[1]['center']['loss'])
