"""Training-step code that must not read device tensors back to the host (each read is a device sync on a GPU).

CPU tensors cannot sync, so the reads are counted as calls: a torch-function mode records every value read
(``item``, ``tolist``, ``bool``/``int``/``float``/``__index__``, ``nonzero``, ``cpu``, ``numpy``) and every
boolean-mask index or assignment (a data-dependent shape). Inputs built before the mode is entered are not counted.
"""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torchvision.models.detection.fcos import FCOSHead as TorchvisionFCOSHead
from torchvision.ops import generalized_box_iou_loss as torchvision_giou_loss

from mtvision.models.backbones.base import BackboneOutput
from mtvision.models.heads.detection import FCOSHead, generalized_box_iou_loss, match_points
from mtvision.models.moe import MoEMlp, auxiliary_losses, pop_layer_statistics, routing_task
from mtvision.optim.gradient_surgery import combine

READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
         torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.cpu, torch.Tensor.numpy}


class HostReads(TorchFunctionMode):
    """Records the name of every read-back call and boolean-mask index made inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            self.calls.append(func.__name__)
        elif func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            indices = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                self.calls.append(f'{func.__name__} with a boolean mask')
        return func(*args, **(kwargs or {}))


def _features(batch: int, channels: int = 32, size: int = 8) -> BackboneOutput:
    """Random ViT-like features of 64 px images: one map at stride 8."""
    tokens = torch.randn(batch, 1 + size * size, channels)
    patch_map = tokens[:, 1:].transpose(1, 2).reshape(batch, channels, size, size)
    return BackboneOutput(maps=[patch_map], tokens=tokens, cls_token=tokens[:, 0], pooled=tokens[:, 1:].mean(dim=1),
                          image_size=(64, 64))


@pytest.mark.parametrize('capacity_factor', [None, 1.0])
def test_moe_forward_and_backward_read_back_only_the_busiest_expert_without_a_capacity(capacity_factor):
    """With a capacity the expert buffers have a size known on the host; without one, the busiest expert's count
    is read once per forward (a buffer of T slots per expert would cost E / k times the routed FLOPs)."""
    torch.manual_seed(0)
    layer = MoEMlp(16, 32, num_experts=4, tasks=['a'], top_k=2, capacity_factor=capacity_factor)
    x = torch.randn(2, 9, 16, requires_grad=True)
    with HostReads() as reads, routing_task(layer, 'a'):
        out = layer(x)
        (out.square().sum() + auxiliary_losses(layer)['balance']).backward()
    assert len(reads.calls) == (1 if capacity_factor is None else 0), reads.calls
    with routing_task(layer, 'a'):  # the expert loop, which reads the routing back, computes the same
        torch.testing.assert_close(out, layer.naive_forward(x), rtol=1e-5, atol=1e-6)


def test_moe_without_capacity_keeps_every_assignment_when_one_expert_takes_all_tokens():
    layer = MoEMlp(8, 16, num_experts=4, tasks=['a'], top_k=2)
    with torch.no_grad():  # every token routes to experts 3 and 2, so each holds all T tokens
        layer.routers['a'].weight.zero_()
        layer.routers['a'].bias.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    x = torch.randn(11, 8)
    with routing_task(layer, 'a'):
        torch.testing.assert_close(layer(x), layer.naive_forward(x), rtol=1e-5, atol=1e-6)
        stats = layer.pop_statistics()
    assert stats['dropped'].tolist() == [0] and stats['usage'][0].tolist() == [0.0, 0.0, 22.0, 22.0]


def test_statistics_of_all_layers_are_read_back_in_one_copy():
    torch.manual_seed(0)
    layers = [MoEMlp(8, 16, num_experts=4, tasks=['a', 'b'], top_k=2, capacity_factor=0.5),
              MoEMlp(8, 16, num_experts=3, tasks=['a', 'b'], top_k=1)]
    for task, tokens in (('a', 10), ('b', 6)):
        for layer in layers:
            with routing_task(layer, task):
                layer(torch.randn(tokens, 8))
    expected = [dict(usage=layer.usage.clone(), dropped=layer.dropped.clone(), assigned=layer.assigned.clone())
                for layer in layers]
    with HostReads() as reads:
        stats = pop_layer_statistics(layers)
    assert reads.calls == ['cpu']
    for got, want, layer in zip(stats, expected, layers):
        assert got['tasks'] == ['a', 'b'] and got['dropped'].dtype == torch.int64
        for key in ('usage', 'dropped', 'assigned'):
            assert torch.equal(got[key], want[key]), key
            assert not getattr(layer, key).any()  # popped
    assert stats[0]['dropped'].sum() > 0 and stats[1]['assigned'].tolist() == [10, 6]


def test_fcos_loss_and_backward_read_nothing_back():
    torch.manual_seed(0)
    head = FCOSHead(num_classes=3, in_channels=[32], in_strides=[8], neck=dict(out_channels=32))
    features = _features(batch=2)
    targets = [dict(boxes=torch.tensor([[4.0, 6.0, 40.0, 38.0]]), labels=torch.tensor([2])),
               dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))]
    normalizer = head.loss_normalizer(targets, (64, 64)).float()  # the host-side count (and label check)
    with HostReads() as reads:
        losses = head.loss(head(features), targets, normalizer=normalizer)
        sum(losses.values()).backward()
    assert reads.calls == []
    assert losses['loss_bbox'] > 0
    # the image without objects gives zero boxes at its points: nothing non-finite reaches the gradients
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


def test_the_normaliser_leaves_the_models_anchor_generator_where_the_forward_put_it():
    """The generator moves its cell anchors to each call's device: host calls would move them off the GPU and
    back every step."""
    head = FCOSHead(num_classes=3, in_channels=[32], in_strides=[8], neck=dict(out_channels=32))
    head(_features(batch=1))
    # float64 stand-ins for anchors on another device: any call of the generator would convert them to its own
    generator = head.fcos.anchor_generator
    generator.cell_anchors = cell_anchors = [anchors.double() for anchors in generator.cell_anchors]
    targets = [dict(boxes=torch.tensor([[4.0, 6.0, 40.0, 38.0]]), labels=torch.tensor([2]))]
    count = head.loss_normalizer(targets, (64, 64))
    assert all(a is b for a, b in zip(generator.cell_anchors, cell_anchors))
    matched = match_points(head._anchor_points((64, 64), 1)[0], targets[0]['boxes'], [64], 1.5)
    assert count == (matched >= 0).sum() > 0


def test_fcos_loss_sums_equal_torchvisions_compute_loss():
    torch.manual_seed(0)
    head = FCOSHead(num_classes=3, in_channels=[32], in_strides=[8], neck=dict(out_channels=32))
    outputs = head(_features(batch=3))
    targets = [dict(boxes=torch.tensor([[4.0, 6.0, 40.0, 38.0], [30.0, 2.0, 60.0, 20.0]]), labels=torch.tensor([2, 0])),
               dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long)),
               dict(boxes=torch.tensor([[0.0, 0.0, 63.0, 63.0]]), labels=torch.tensor([1]))]
    matched = [match_points(anchors, t['boxes'], outputs['num_anchors_per_level'], head.fcos.center_sampling_radius)
               for anchors, t in zip(outputs['anchors'], targets)]
    head_outputs = {key: outputs[key].float() for key in ('cls_logits', 'bbox_regression', 'bbox_ctrness')}
    expected = TorchvisionFCOSHead.compute_loss(head.fcos.head, targets, head_outputs, outputs['anchors'], matched)
    losses = head.loss(outputs, targets)
    for ours, theirs in [('loss_cls', 'classification'), ('loss_bbox', 'bbox_regression'),
                         ('loss_centerness', 'bbox_ctrness')]:
        torch.testing.assert_close(losses[ours], expected[theirs])


def test_giou_loss_equals_torchvisions_per_box():
    torch.manual_seed(0)
    corners = torch.rand(64, 2, 2) * 10
    boxes1 = torch.cat([corners[:, 0], corners[:, 0] + torch.rand(64, 2) * 5], dim=1)
    boxes2 = torch.cat([corners[:, 1], corners[:, 1] + torch.rand(64, 2) * 5], dim=1)  # some overlap, some not
    torch.testing.assert_close(generalized_box_iou_loss(boxes1, boxes2), torchvision_giou_loss(boxes1, boxes2),
                               rtol=0, atol=0)


def test_combine_reads_the_weights_once_for_all_buckets():
    torch.manual_seed(0)
    buckets = [torch.randn(3, 5, 4), torch.randn(3, 7), torch.randn(3, 2, 2, 2)]
    weights = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    with HostReads() as reads:
        updates = combine(weights, buckets)
    assert reads.calls == ['tolist']
    for update, bucket in zip(updates, buckets):
        torch.testing.assert_close(update, torch.einsum('t,t...->...', weights.float(), bucket))

