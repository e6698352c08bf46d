import pytest
import torch
from torchvision import tv_tensors
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import box_iou

from mtvision.models.heads.mask_rcnn import MaskRCNNHead

SMALL_TOP_N = dict(training=200, testing=200)  # proposals: fewer than torchvision's, for speed
LOSS_KEYS = {'loss_objectness', 'loss_rpn_box_reg', 'loss_classifier', 'loss_box_reg', 'loss_mask'}


def make_head(in_channels=(32,), **kwargs) -> MaskRCNNHead:
    torch.manual_seed(0)
    return MaskRCNNHead(num_classes=3, in_channels=list(in_channels), in_strides=[8],
                        **{'neck': dict(out_channels=32), 'box_fc_dim': 64, 'mask_convs': 2, **kwargs})


def ellipse(box: list[float], size: int) -> torch.Tensor:
    """A filled ellipse inscribed in ``box`` (XYXY) on a ``size`` x ``size`` uint8 mask: not its box."""
    x1, y1, x2, y2 = box
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing='ij')
    inside = ((xs - (x1 + x2) / 2) / ((x2 - x1) / 2)) ** 2 + ((ys - (y1 + y2) / 2) / ((y2 - y1) / 2)) ** 2 <= 1
    return inside.to(torch.uint8)


def make_targets(boxes_and_labels, size: int) -> list[dict]:
    return [dict(boxes=torch.tensor([box for box, _ in image], dtype=torch.float32).reshape(-1, 4),
                 labels=torch.tensor([label for _, label in image], dtype=torch.int64),
                 masks=torch.stack([ellipse(box, size) for box, _ in image]) if image
                 else torch.zeros(0, size, size, dtype=torch.uint8))
            for image in boxes_and_labels]


TARGETS_64 = make_targets([[([4.0, 6.0, 24.0, 22.0], 2), ([30.0, 24.0, 60.0, 58.0], 0)],
                           [([10.0, 8.0, 40.0, 34.0], 1)]], 64)
TARGETS_32 = make_targets([[([2.0, 3.0, 20.0, 25.0], 2)], [([0.0, 0.0, 31.0, 31.0], 0), ([5.0, 6.0, 14.0, 16.0], 1)]],
                          32)


def test_losses_and_detections_equal_torchvisions_own_forward(tiny_vit):
    """The split forward / loss / predict against torchvision's RegionProposalNetwork and RoIHeads forwards on the
    same modules (same seed: their samplers draw from the global generator in the same order)."""
    head = make_head(tiny_vit.out_channels)
    images = torch.randn(2, 3, 32, 32)
    features = tiny_vit(images)
    image_list = ImageList(images, [(32, 32)] * 2)
    torchvision_targets = [dict(target, labels=target['labels'] + 1) for target in TARGETS_32]

    head.train()
    torch.manual_seed(1)
    losses = head.loss(head(features), TARGETS_32)
    torch.manual_seed(1)
    levels = head.neck(features.maps)
    proposals, expected = head.rpn(image_list, levels, torchvision_targets)
    _, roi_losses = head.roi_heads(levels, proposals, image_list.image_sizes, torchvision_targets)
    expected.update(roi_losses)
    assert losses.keys() == expected.keys() == LOSS_KEYS
    for key in LOSS_KEYS:
        torch.testing.assert_close(losses[key], expected[key])

    head.eval()
    with torch.no_grad():
        detections = head.predict(head(features))
        levels = head.neck(features.maps)
        proposals, _ = head.rpn(image_list, levels)
        expected_detections, _ = head.roi_heads(levels, proposals, image_list.image_sizes)
    assert len(expected_detections[0]['boxes']) > 0
    for ours, theirs in zip(detections, expected_detections):
        for key in ('boxes', 'scores'):
            torch.testing.assert_close(ours[key], theirs[key])
        torch.testing.assert_close(ours['labels'], theirs['labels'] - 1)  # contiguous labels outside the head
        # GeneralizedRCNNTransform.postprocess at an unchanged size
        torch.testing.assert_close(ours['masks'], paste_masks_in_image(theirs['masks'], theirs['boxes'], (32, 32)))


def test_predict_format(fake_features):
    head = make_head(detections_per_img=5).eval()
    detections = head.predict(head(fake_features(batch=3)))

    assert len(detections) == 3
    for detection in detections:
        boxes, scores, labels, masks = (detection[key] for key in ('boxes', 'scores', 'labels', 'masks'))
        assert 0 < len(boxes) <= 5 and boxes.shape == (len(scores), 4) and labels.shape == scores.shape
        assert masks.shape == (len(boxes), 1, 64, 64) and masks.dtype == torch.float32
        assert ((masks >= 0) & (masks <= 1)).all()
        assert labels.dtype == torch.int64 and ((labels >= 0) & (labels < 3)).all()
        assert (scores > 0.05).all() and (boxes >= 0).all() and (boxes <= 64).all()


def test_overfitting_one_batch_lowers_the_losses_and_finds_the_objects_and_their_masks(fake_features):
    head = make_head(box_batch_size_per_image=64, rpn_batch_size_per_image=64, rpn_pre_nms_top_n=SMALL_TOP_N,
                     rpn_post_nms_top_n=SMALL_TOP_N).train()
    features = fake_features()
    optimizer = torch.optim.AdamW(head.parameters(), lr=2e-3)
    history = []
    for _ in range(40):
        terms = head.loss(head(features), TARGETS_64)
        assert terms.keys() == LOSS_KEYS and all(torch.isfinite(term) for term in terms.values())
        optimizer.zero_grad()
        sum(terms.values()).backward()
        optimizer.step()
        history.append({key: term.item() for key, term in terms.items()})
    first, last = history[0], history[-1]
    assert sum(last.values()) < sum(first.values()) / 4, (first, last)
    # each falls 10-35x here; the box regression first rises (it averages over the sampled RoIs, whose positives
    # grow as the proposals improve), so the boxes found below check it
    for key in LOSS_KEYS - {'loss_box_reg'}:
        assert last[key] < first[key] / 3, (key, first, last)

    head.eval()
    for detection, target in zip(head.predict(head(features)), TARGETS_64):
        iou = box_iou(target['boxes'], detection['boxes'])
        best = iou.argmax(dim=1)  # each object's best-overlapping detection
        assert (iou.max(dim=1).values > 0.7).all()
        assert torch.equal(detection['labels'][best], target['labels'])
        predicted = detection['masks'][best, 0] > 0.5
        truth = target['masks'].bool()
        mask_iou = (predicted & truth).sum(dim=(1, 2)) / (predicted | truth).sum(dim=(1, 2))
        assert (mask_iou > 0.7).all(), mask_iou


def test_images_without_objects_and_tv_tensors_give_finite_losses(fake_features):
    head = make_head().train()
    outputs = head(fake_features())
    wrapped = [dict(boxes=tv_tensors.BoundingBoxes(target['boxes'], format='XYXY', canvas_size=(64, 64)),
                    labels=target['labels'], masks=tv_tensors.Mask(target['masks'])) for target in TARGETS_64]
    empty = make_targets([[]], 64)[0]
    torch.manual_seed(0)
    plain = head.loss(outputs, TARGETS_64)
    torch.manual_seed(0)
    from_tv = head.loss(outputs, wrapped)
    for key in LOSS_KEYS:
        torch.testing.assert_close(from_tv[key], plain[key])
    terms = head.loss(outputs, [TARGETS_64[0], empty])
    assert terms.keys() == LOSS_KEYS and all(torch.isfinite(term) for term in terms.values())


def test_losses_are_float32_under_mixed_precision(fake_features):
    head = make_head().train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outputs = head(fake_features())
        terms = head.loss(outputs, TARGETS_64)
    assert outputs['objectness'].dtype == torch.bfloat16 and outputs['anchors'][0].dtype == torch.float32
    assert all(term.dtype == torch.float32 and torch.isfinite(term) for term in terms.values())


@pytest.mark.parametrize('second, error, message', [
    (None, ValueError, '1 instance segmentation targets for a batch of 2'),
    (dict(TARGETS_64[1], labels=torch.tensor([3])), ValueError, r'target 1: labels \[3\]'),
    ({key: value for key, value in TARGETS_64[1].items() if key != 'masks'}, KeyError, "target 1 has no 'masks'"),
    (dict(TARGETS_64[1], masks=torch.zeros(1, 32, 32, dtype=torch.uint8)), ValueError, r'masks must be \[N, H, W\]'),
])
def test_bad_targets_are_named(fake_features, second, error, message):
    head = make_head().train()
    targets = [TARGETS_64[0]] + ([] if second is None else [second])
    with pytest.raises(error, match=message):
        head.loss(head(fake_features()), targets)


@pytest.mark.parametrize('kwargs, message', [
    (dict(anchor_sizes=(16, 32)), 'one size per neck level'),
    (dict(anchor_sizes=(1, 8, 16)), 'at least 2'),
    (dict(num_classes=0), 'num_classes >= 1'),
])
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskRCNNHead(**{'num_classes': 3, 'in_channels': [32], 'in_strides': [8], **kwargs})


def test_instance_segmentation_maps_boxes_and_masks_to_the_original_frame():
    from types import SimpleNamespace

    from mtvision.task_types import task_type_spec

    mask = torch.zeros(8, 8)
    mask[2:5, 1:6] = 1.0
    prediction = dict(boxes=torch.tensor([[1.0, 2.0, 6.0, 5.0]]), scores=torch.tensor([0.8]),
                      labels=torch.tensor([1]), masks=mask[None, None])
    head = SimpleNamespace(predict=lambda outputs: [prediction])
    (mapped,) = task_type_spec('instance_segmentation').per_image_predictions(head, None, [(16, 16)], (8, 8),
                                                                              ['a', 'b'])
    torch.testing.assert_close(mapped['boxes'], torch.tensor([[2.0, 4.0, 12.0, 10.0]]))
    assert mapped['label_names'] == ['b']
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[4:10, 2:12] = True  # each pixel of the block repeated 2 x 2 times: a 2x bilinear upscaling over 0.5
    assert torch.equal(mapped['masks'], expected[None])
