import math

import pytest
import torch
import torch.nn.functional as F

from mtvision.models.ema import cosine_momentum, ema_update
from mtvision.models.heads.contrastive import (MoCoV3Head, SimCLRHead, info_nce_loss, nt_xent_loss,
                                               projection_mlp)
from mtvision.models.multitask import MultiTaskModel

BACKBONE = dict(type='ViT', model_name='vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=2,
                num_heads=2)


def loop_nt_xent(z: torch.Tensor, tau: float) -> float:
    """NT-Xent written from SimCLR's definition, one anchor at a time, in float64 Python arithmetic."""
    z = z.double().tolist()
    n = len(z) // 2
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        sims = [sum(a * b for a, b in zip(z[i], z[k])) / tau for k in range(2 * n)]
        denominator = sum(math.exp(sims[k]) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(sims[positive]) / denominator)
    return total / (2 * n)


def loop_info_nce(q: torch.Tensor, k: torch.Tensor, tau: float) -> float:
    q, k = q.double().tolist(), k.double().tolist()
    total = 0.0
    for i in range(len(q)):
        sims = [sum(a * b for a, b in zip(q[i], key)) / tau for key in k]
        total += -math.log(math.exp(sims[i]) / sum(math.exp(s) for s in sims))
    return total / len(q)


def test_nt_xent_matches_its_definition():
    torch.manual_seed(0)
    z = F.normalize(torch.randn(10, 6), dim=-1)
    for tau in (0.1, 0.5):
        assert nt_xent_loss(z, tau).item() == pytest.approx(loop_nt_xent(z, tau), rel=1e-5)


def test_info_nce_hand_computed_value():
    # orthonormal pairs: each query scores 1/tau on its key and 0 on the other, so the loss is log(1 + exp(-1/tau))
    q = torch.eye(2)
    assert info_nce_loss(q, q.clone(), 0.5).item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)
    torch.manual_seed(1)
    q, k = F.normalize(torch.randn(5, 4), dim=-1), F.normalize(torch.randn(5, 4), dim=-1)
    assert info_nce_loss(q, k, 0.2).item() == pytest.approx(loop_info_nce(q, k, 0.2), rel=1e-5)


def test_nt_xent_rejects_an_odd_batch():
    with pytest.raises(ValueError, match='two views'):
        nt_xent_loss(torch.randn(5, 3), 0.1)


def test_cosine_momentum_schedule():
    assert cosine_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 100, 100) == pytest.approx(1.0)
    assert cosine_momentum(0.9, 25, 100) == pytest.approx(1 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)


def mocov3_model() -> MultiTaskModel:
    torch.manual_seed(0)
    head = dict(type='MoCoV3Head', hidden_dim=16, out_dim=8, temperature=0.2, momentum=0.9)
    return MultiTaskModel(BACKBONE, {'moco': head})


def test_momentum_update_follows_the_formula():
    model = mocov3_model()
    with torch.no_grad():  # make online and momentum weights differ
        for p in model.backbone.parameters():
            p.add_(torch.randn_like(p))
        for p in model.heads['moco'].projector.parameters():
            p.add_(torch.randn_like(p))
    pairs = [(model.momentum_backbones['moco'], model.backbone),
             (model.heads['moco'].momentum_projector, model.heads['moco'].projector)]
    before = [[p.clone() for p in target.parameters()] for target, _ in pairs]
    model.update_momentum(['moco'], step=30, max_steps=120)
    m = 1 - 0.1 * (math.cos(math.pi * 30 / 120) + 1) / 2
    for (target, online), old in zip(pairs, before):
        for new, previous, online_param in zip(target.parameters(), old, online.parameters()):
            torch.testing.assert_close(new, m * previous + (1 - m) * online_param)
    # tasks without a momentum head are left alone, and reset copies the online weights back
    model.update_momentum(['other'], step=30, max_steps=120)
    model.reset_momentum()
    for target, online in zip(model.momentum_backbones['moco'].parameters(), model.backbone.parameters()):
        torch.testing.assert_close(target, online)


def test_mocov3_keys_come_from_the_momentum_encoder_and_the_loss_is_symmetric():
    model = mocov3_model().train()
    head = model.heads['moco']
    with torch.no_grad():
        for p in model.momentum_backbones['moco'].parameters():
            p.mul_(0.5)
    images = torch.randn(8, 3, 32, 32)
    outputs = model('moco', images)
    with torch.no_grad():  # train mode: BatchNorm uses the batch statistics, so a second call gives the same keys
        keys = head.momentum_projector(model.momentum_backbones['moco'](images).cls_token)
    torch.testing.assert_close(outputs['keys'], keys)
    q1, q2 = F.normalize(outputs['queries'], dim=-1).chunk(2)
    k1, k2 = F.normalize(outputs['keys'], dim=-1).chunk(2)
    expected = 2 * 0.2 * (loop_info_nce(q1.detach(), k2, 0.2) + loop_info_nce(q2.detach(), k1, 0.2))
    loss = head.loss(outputs)['loss_contrastive']
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in model.momentum_backbones['moco'].parameters())
    assert all(p.grad is None for p in head.momentum_projector.parameters())
    assert model.backbone.model.cls_token.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in model.momentum_backbones['moco'].parameters())


def test_mocov3_loss_needs_the_keys():
    head = MoCoV3Head(embed_dim=8, hidden_dim=8, out_dim=4)
    with pytest.raises(ValueError, match='momentum keys'):
        head.loss(dict(queries=torch.randn(4, 4), embeddings=torch.randn(4, 4)))


def test_simclr_training_pulls_views_together():
    torch.manual_seed(0)
    model = MultiTaskModel(BACKBONE, {'simclr': dict(type='SimCLRHead', hidden_dim=32, out_dim=16)}).train()
    images = torch.randn(4, 3, 32, 32)
    views = torch.cat([images, images.flip(-1)])  # view 2 = the mirrored image
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        loss = model.loss('simclr', dict(images=views, targets=None))['loss_contrastive']
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert not model.momentum_backbones  # SimCLR has no momentum encoder


def test_contrastive_heads_reject_a_batch_without_two_views():
    model = MultiTaskModel(BACKBONE, {'simclr': dict(type='SimCLRHead', hidden_dim=8, out_dim=4)})
    with pytest.raises(ValueError, match='collate_views'):
        model('simclr', torch.randn(3, 3, 32, 32))


def test_projection_mlp_layout():
    mlp = projection_mlp(8, 16, 4, num_layers=3)
    linears = [m for m in mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 16), (16, 16), (16, 4)]
    assert isinstance(mlp[-1], torch.nn.BatchNorm1d) and not mlp[-1].affine
    assert isinstance(projection_mlp(8, 16, 4, 2, last_bn=False)[-1], torch.nn.Linear)


def test_ema_update_refuses_mismatched_modules():
    with pytest.raises(ValueError, match='different parameters'):
        ema_update(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)), 0.5)


def test_simclr_head_predicts_normalised_embeddings():
    head = SimCLRHead(embed_dim=8, hidden_dim=8, out_dim=4)
    embeddings = head.predict(dict(embeddings=torch.randn(6, 4) * 5))
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(6))
