import pytest
import torch
from torch import nn
from torchvision import tv_tensors
from torchvision.models.detection import FCOS
from torchvision.ops import box_iou, sigmoid_focal_loss

from mtvision.models.heads.detection import FCOSHead

TARGETS = [
    dict(boxes=torch.tensor([[4.0, 6.0, 20.0, 18.0], [10.0, 12.0, 30.0, 31.0]]), labels=torch.tensor([2, 0])),
    dict(boxes=torch.tensor([[0.0, 0.0, 12.0, 9.0]]), labels=torch.tensor([1])),
]


def make_head(in_channels=(32,), **kwargs) -> FCOSHead:
    torch.manual_seed(0)
    return FCOSHead(num_classes=3, in_channels=list(in_channels), in_strides=[8], neck=dict(out_channels=32),
                    **kwargs)


class _PyramidOfImages(nn.Module):
    """ViT + neck as one image-to-pyramid module, the way torchvision's FCOS wants its backbone."""

    def __init__(self, vit: nn.Module, neck: nn.Module):
        super().__init__()
        self.vit, self.neck, self.out_channels = vit, neck, neck.out_channels

    def forward(self, images):
        return self.neck(self.vit(images).maps)


def test_losses_and_detections_equal_torchvisions_own_fcos_forward(tiny_vit):
    head = make_head(tiny_vit.out_channels)
    # torchvision's complete FCOS on the same weights; its transform is made a no-op (no resize, identity norm).
    reference = FCOS(_PyramidOfImages(tiny_vit, head.fcos.backbone), num_classes=3, min_size=32, max_size=32,
                     image_mean=[0.0] * 3, image_std=[1.0] * 3, anchor_generator=head.fcos.anchor_generator,
                     head=head.fcos.head, score_thresh=head.fcos.score_thresh, nms_thresh=head.fcos.nms_thresh)
    images = torch.randn(2, 3, 32, 32)

    reference.train()
    expected = reference(list(images), TARGETS)
    losses = head.loss(head(tiny_vit(images)), TARGETS)
    assert expected['bbox_regression'] > 0  # the boxes do have positive points
    for ours, theirs in [('loss_cls', 'classification'), ('loss_bbox', 'bbox_regression'),
                         ('loss_centerness', 'bbox_ctrness')]:
        torch.testing.assert_close(losses[ours], expected[theirs])

    reference.eval()
    with torch.no_grad():
        expected_detections = reference(list(images))
        detections = head.predict(head(tiny_vit(images)))
    assert len(expected_detections[0]['boxes']) > 0
    for ours, theirs in zip(detections, expected_detections):
        for key in ('boxes', 'scores', 'labels'):
            torch.testing.assert_close(ours[key], theirs[key])


def test_the_normaliser_counts_the_positive_points_and_splits_the_batch_loss_exactly(fake_features):
    """Counted from targets and image size alone, the positives are what the loss divides by; the loss of each image
    divided by the batch's count sums to the batch's loss (what ranks and micro-batches rely on)."""
    head = make_head()
    features = fake_features()
    outputs = head(features)
    whole = head.loss(outputs, TARGETS)
    count = head.loss_normalizer(TARGETS, features.image_size)
    assert count > 2  # several points per box
    # dividing by the count itself changes nothing; by twice the count halves every term
    for key, value in head.loss(outputs, TARGETS, normalizer=count).items():
        torch.testing.assert_close(value, whole[key])
        torch.testing.assert_close(head.loss(outputs, TARGETS, normalizer=2 * count)[key], whole[key] / 2)
    # the per-image counts add up to it, and so do the per-image losses divided by it
    assert sum(head.loss_normalizer([target], features.image_size) for target in TARGETS) == count
    per_image = ('cls_logits', 'bbox_regression', 'bbox_ctrness', 'anchors')
    parts = [head.loss({key: value[i:i + 1] if key in per_image else value for key, value in outputs.items()},
                       [TARGETS[i]], normalizer=count) for i in range(len(TARGETS))]
    for key, value in whole.items():
        torch.testing.assert_close(parts[0][key] + parts[1][key], value)


def test_images_without_objects_only_teach_background(fake_features):
    head = make_head()
    outputs = head(fake_features())
    empty = [dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))] * 2
    losses = head.loss(outputs, empty)

    assert losses['loss_bbox'] == 0 and losses['loss_centerness'] == 0
    # No positives: the focal loss is summed over all points and divided by max(1, 0) = 1.
    expected = sigmoid_focal_loss(outputs['cls_logits'], torch.zeros_like(outputs['cls_logits']), reduction='sum')
    torch.testing.assert_close(losses['loss_cls'], expected)
    sum(losses.values()).backward()
    assert head.fcos.head.classification_head.cls_logits.bias.grad.abs().sum() > 0


def test_bounding_boxes_tv_tensors_give_the_same_loss_as_plain_tensors(fake_features):
    head = make_head()
    outputs = head(fake_features())
    wrapped = [dict(boxes=tv_tensors.BoundingBoxes(t['boxes'], format='XYXY', canvas_size=(64, 64)),
                    labels=t['labels']) for t in TARGETS]
    plain, from_tv = head.loss(outputs, TARGETS), head.loss(outputs, wrapped)
    for key in plain:
        torch.testing.assert_close(from_tv[key], plain[key])


def test_predict_format(fake_features):
    head = make_head(detections_per_img=5, score_thresh=0.05)
    detections = head.predict(head(fake_features(batch=3)))

    assert len(detections) == 3
    for detection in detections:
        boxes, scores, labels = detection['boxes'], detection['scores'], detection['labels']
        assert 0 < len(boxes) <= 5 and boxes.shape == (len(scores), 4) and labels.shape == scores.shape
        assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
        assert (boxes >= 0).all() and (boxes <= 64).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
        assert (scores > 0.05).all() and ((labels >= 0) & (labels < 3)).all()


def test_anchors_stay_float32_under_mixed_precision(fake_features):
    head = make_head()
    features = fake_features()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        mixed = head(features)
    assert mixed['cls_logits'].dtype == torch.bfloat16
    for anchors, exact in zip(mixed['anchors'], head(features)['anchors']):
        assert anchors.dtype == torch.float32
        torch.testing.assert_close(anchors, exact, rtol=0, atol=0)
    assert head.loss(mixed, TARGETS)['loss_bbox'].dtype == torch.float32


@pytest.mark.parametrize('targets, error, message', [
    (TARGETS[:1], ValueError, '1 detection targets for a batch of 2'),
    ([TARGETS[0], dict(boxes=TARGETS[1]['boxes'], labels=torch.tensor([3]))], ValueError, r'target 1: labels \[3\]'),
    ([TARGETS[0], dict(boxes=TARGETS[1]['boxes'])], KeyError, "target 1 has no 'labels'"),
    ([TARGETS[0], dict(boxes=torch.zeros(4), labels=torch.zeros(1, dtype=torch.long))], ValueError, r'\[N, 4\]'),
])
def test_bad_targets_are_named(fake_features, targets, error, message):
    head = make_head()
    with pytest.raises(error, match=message):
        head.loss(head(fake_features()), targets)


@pytest.mark.parametrize('kwargs, message', [
    (dict(neck=dict(out_channels=48)), 'divisible by 32'),
    (dict(anchor_sizes=(4, 8)), 'one size per neck level'),
    (dict(anchor_sizes=(1, 8, 16)), 'at least 2'),
])
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FCOSHead(num_classes=3, in_channels=[32], in_strides=[8], **{'neck': dict(out_channels=32), **kwargs})


def test_overfitting_one_batch_lowers_the_loss_and_finds_the_boxes(fake_features):
    head = make_head()
    features = fake_features()
    targets = [
        dict(boxes=torch.tensor([[4.0, 6.0, 20.0, 18.0], [30.0, 24.0, 60.0, 58.0]]), labels=torch.tensor([2, 0])),
        dict(boxes=torch.tensor([[10.0, 8.0, 36.0, 30.0]]), labels=torch.tensor([1])),
    ]
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        loss = sum(head.loss(head(features), targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 3

    for detection, target in zip(head.predict(head(features)), targets):
        top = slice(0, len(target['boxes']))
        iou = box_iou(target['boxes'], detection['boxes'][top])
        matched = iou.argmax(dim=1)
        assert (iou.max(dim=1).values > 0.7).all()
        assert torch.equal(detection['labels'][top][matched], target['labels'])
