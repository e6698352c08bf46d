"""FCOS object detection head on a simple feature pyramid, with torchvision's FCOS doing the work."""
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead as TorchvisionFCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import sigmoid_focal_loss

from mtvision.models.backbones.base import BackboneOutput
from mtvision.models.necks import build_neck
from mtvision.registry import MODELS


def match_points(anchors: Tensor, boxes: Tensor, num_anchors_per_level: Sequence[int],
                 center_sampling_radius: float) -> Tensor:
    """FCOS's assignment of anchor points to boxes, by the rule of torchvision's ``FCOS.compute_loss``: for each of the
    ``P`` points of ``anchors`` ``[P, 4]`` the index of the box of ``boxes`` ``[M, 4]`` (XYXY) it learns, or -1.

    A point may learn a box when it lies inside it, within ``center_sampling_radius`` anchor sizes of its centre,
    and the box's farthest edge from the point is within its level's range (``4a`` to ``8a`` for anchor size ``a``;
    from 0 at the first level, unbounded at the last); of several such boxes it learns the smallest.
    """
    if boxes.numel() == 0:
        return torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
    points = (anchors[:, :2] + anchors[:, 2:]) / 2
    sizes = anchors[:, 2] - anchors[:, 0]
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    near_center = (points[:, None] - centers[None]).abs().amax(dim=2) < center_sampling_radius * sizes[:, None]
    x, y = points[:, 0:1], points[:, 1:2]
    edges = torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], dim=2)  # [P, M, 4]
    lower, upper = sizes * 4, sizes * 8
    lower[:num_anchors_per_level[0]] = 0
    upper[-num_anchors_per_level[-1]:] = float('inf')
    farthest = edges.amax(dim=2)
    candidate = near_center & (edges.amin(dim=2) > 0) & (farthest > lower[:, None]) & (farthest < upper[:, None])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # the smallest candidate box wins (torchvision's float32 score, for the same ties)
    score, index = (candidate.to(torch.float32) * (1e8 - areas[None])).max(dim=1)
    return torch.where(score < 1e-5, -1, index)


def generalized_box_iou_loss(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """``1 - GIoU`` of the XYXY boxes ``boxes1`` and ``boxes2`` ``[..., 4]``, per box (no reduction): the arithmetic of
    ``torchvision.ops.generalized_box_iou_loss``, whose intersection is written through a boolean mask (a
    data-dependent shape, so a device sync); here a ``torch.where`` computes the same values at a fixed shape."""
    x1, y1, x2, y2 = boxes1.unbind(dim=-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(dim=-1)
    inner_x1, inner_y1 = torch.max(x1, x1g), torch.max(y1, y1g)
    inner_x2, inner_y2 = torch.min(x2, x2g), torch.min(y2, y2g)
    overlaps = (inner_y2 > inner_y1) & (inner_x2 > inner_x1)
    intersection = torch.where(overlaps, (inner_x2 - inner_x1) * (inner_y2 - inner_y1), 0.0)
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - intersection
    iou = intersection / (union + eps)
    enclosing = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    return 1 - (iou - (enclosing - union) / (enclosing + eps))


def fcos_loss_sums(targets: Sequence[dict[str, Tensor]], head_outputs: dict[str, Tensor], anchors: Sequence[Tensor],
                   matched: Sequence[Tensor], box_coder) -> tuple[dict[str, Tensor], Tensor]:
    """The three FCOS loss sums of torchvision's ``FCOSHead.compute_loss`` (``classification``: sigmoid focal over
    every point and class; ``bbox_regression``: GIoU and ``bbox_ctrness``: centre-ness BCE over the positive points)
    and the number of positive points, before any division.

    torchvision selects the positive points with boolean masks and reads their count with ``.item()``: device syncs
    on every call. Here every term is computed at all ``B x P`` points and the background ones are zeroed by
    ``torch.where`` before the sums, so no shape depends on the data. Background points get their anchor boxes as
    stand-in boxes and a zero centre-ness target first: their real ones can give 0/0, whose NaN would reach the
    gradient through the ``where``.
    """
    classes, gt_boxes = [], []
    for target, matched_per_image in zip(targets, matched):
        if target['labels'].numel():
            index = matched_per_image.clamp(min=0)
            classes.append(torch.where(matched_per_image >= 0, target['labels'][index], -1))
            gt_boxes.append(target['boxes'][index])
        else:
            classes.append(torch.full_like(matched_per_image, -1))
            gt_boxes.append(target['boxes'].new_zeros(len(matched_per_image), 4))
    classes, gt_boxes, anchors = torch.stack(classes), torch.stack(gt_boxes), torch.stack(list(anchors))
    foreground = classes >= 0  # [B, P]
    cls_logits = head_outputs['cls_logits']
    # background rows (class -1) match no column: all zeros, as torchvision's one-hot targets
    one_hot = classes[..., None] == torch.arange(cls_logits.shape[-1], device=classes.device)
    loss_cls = sigmoid_focal_loss(cls_logits, one_hot.to(cls_logits.dtype), reduction='sum')

    pred_boxes = box_coder.decode(head_outputs['bbox_regression'], anchors)
    # the anchor boxes (of positive size) stand in at the background points
    giou = generalized_box_iou_loss(torch.where(foreground[..., None], pred_boxes, anchors),
                                    torch.where(foreground[..., None], gt_boxes, anchors))
    loss_bbox = torch.where(foreground, giou, 0.0).sum()

    reg_targets = box_coder.encode(anchors, gt_boxes)
    left_right, top_bottom = reg_targets[..., [0, 2]], reg_targets[..., [1, 3]]
    ctrness = torch.sqrt((left_right.min(dim=-1)[0] / left_right.max(dim=-1)[0])
                         * (top_bottom.min(dim=-1)[0] / top_bottom.max(dim=-1)[0]))
    ctrness = torch.where(foreground, ctrness, 0.0)
    bce = F.binary_cross_entropy_with_logits(head_outputs['bbox_ctrness'].squeeze(dim=2), ctrness, reduction='none')
    loss_ctrness = torch.where(foreground, bce, 0.0).sum()
    return dict(classification=loss_cls, bbox_regression=loss_bbox, bbox_ctrness=loss_ctrness), foreground.sum()


@MODELS.register_module()
class FCOSHead(nn.Module):
    """FCOS (Tian et al., 2019) on a neck: torchvision's FCOS head, anchor points, loss and post-processing.

    A :class:`torchvision.models.detection.FCOS` is held as ``self.fcos`` with the neck as its ``backbone`` (so the
    neck's weights live under ``fcos.backbone``); its ``head``, ``anchor_generator``, ``box_coder`` and
    ``postprocess_detections`` (top-k, box decoding, batched NMS) are called directly. The loss is the arithmetic of
    its ``compute_loss`` (centre sampling, focal + GIoU + centre-ness losses) at fixed shapes
    (:func:`match_points`, :func:`fcos_loss_sums`), which reads nothing back from the device. Its ``transform`` is
    never used: images reach the backbone already resized and normalised.

    One anchor point per location and level. torchvision's FCOS derives three things from a level's anchor size
    ``a``: which boxes the level learns (those whose farthest edge from the point lies between ``4a`` and ``8a``; from 0
    at the first level, unbounded at the last), the centre-sampling radius (``center_sampling_radius * a``) and the
    unit of the regression targets.

    Args:
        num_classes: number of object classes; labels are contiguous ``0..num_classes - 1``.
        in_channels: channels of each backbone map.
        in_strides: stride of each backbone map.
        embed_dim: unused; every head is built with the backbone's width.
        neck: neck config, on top of :data:`mtvision.models.necks.DEFAULT_NECK`; its ``out_channels`` must be a
            multiple of 32 (torchvision's head uses GroupNorm with 32 groups).
        num_convs: 3x3 convolutions in each of the classification and regression towers (FCOS uses 4).
        anchor_sizes: anchor size per pyramid level, finest first; by default each level's stride (torchvision's
            FCOS convention). With the default neck on 64x64 images (strides 4, 8, 16) objects of 8-40 px are all
            regressed from the stride-4 level with several positive points each; halving the sizes would spread
            them over two levels but leave some small objects with no positive point at all.
        center_sampling_radius: positive points lie within this many anchor sizes of a box centre.
        score_thresh: minimum score of a detection (low by default: COCO mAP rewards recall).
        nms_thresh: IoU above which NMS suppresses a box of the same class.
        detections_per_img: detections kept per image after NMS.
        topk_candidates: candidates kept per level before NMS.
    """

    def __init__(self, num_classes: int, in_channels: Sequence[int], in_strides: Sequence[int],
                 embed_dim: int | None = None, neck: dict | None = None, num_convs: int = 2,
                 anchor_sizes: Sequence[int] | None = None, center_sampling_radius: float = 1.5,
                 score_thresh: float = 0.05, nms_thresh: float = 0.6, detections_per_img: int = 100,
                 topk_candidates: int = 1000):
        super().__init__()
        neck = build_neck(neck, in_channels, in_strides)
        if neck.out_channels % 32 != 0:
            raise ValueError(f'FCOSHead needs neck out_channels divisible by 32 (GroupNorm groups), got '
                             f'{neck.out_channels}')
        anchor_sizes = list(neck.strides if anchor_sizes is None else anchor_sizes)
        if len(anchor_sizes) != len(neck.strides):
            raise ValueError(f'anchor_sizes {tuple(anchor_sizes)} must give one size per neck level '
                             f'(strides {tuple(neck.strides)})')
        if min(anchor_sizes) < 2:
            # torchvision rounds anchor corners to integers, which turns a size-1 anchor into an empty box.
            raise ValueError(f'anchor_sizes must be at least 2, got {tuple(anchor_sizes)}')
        self.num_classes = num_classes
        self._host_anchors: dict[tuple[int, int], Tensor] = {}  # by image size, see _host_anchor_points
        anchor_generator = AnchorGenerator(sizes=tuple((size,) for size in anchor_sizes),
                                           aspect_ratios=((1.0,),) * len(anchor_sizes))
        self.fcos = FCOS(
            neck, num_classes, anchor_generator=anchor_generator,
            head=TorchvisionFCOSHead(neck.out_channels, num_anchors=1, num_classes=num_classes, num_convs=num_convs),
            center_sampling_radius=center_sampling_radius, score_thresh=score_thresh, nms_thresh=nms_thresh,
            detections_per_img=detections_per_img, topk_candidates=topk_candidates)

    def forward(self, features: BackboneOutput) -> dict[str, Any]:
        """Head outputs and what loss and predict need.

        Returns:
            dict with ``cls_logits`` ``[B, P, K]``, ``bbox_regression`` ``[B, P, 4]``, ``bbox_ctrness`` ``[B, P, 1]``
            over the ``P`` points of all levels, ``anchors`` (one ``[P, 4]`` per image), ``num_anchors_per_level``
            and ``image_size`` ``(H, W)``.
        """
        levels = list(self.fcos.backbone(features.maps).values())
        outputs = self.fcos.head(levels)
        batch_size, (height, width) = levels[0].shape[0], features.image_size
        outputs['anchors'] = self._anchor_points((height, width), batch_size, levels[0].device)
        outputs['num_anchors_per_level'] = [level.shape[-2] * level.shape[-1] for level in levels]
        outputs['image_size'] = (height, width)
        expected = self._level_sizes((height, width))
        if [tuple(level.shape[-2:]) for level in levels] != expected:
            # loss_normalizer places the anchor points from the image size alone
            raise ValueError(f'FCOSHead: images of {height}x{width} gave pyramid levels of '
                             f'{[tuple(level.shape[-2:]) for level in levels]}, not image size // stride '
                             f'{expected}: use an image size divisible by the largest stride '
                             f'{max(self.fcos.backbone.strides)}')
        return outputs

    def _level_sizes(self, image_size: tuple[int, int]) -> list[tuple[int, int]]:
        return [(image_size[0] // stride, image_size[1] // stride) for stride in self.fcos.backbone.strides]

    def _anchor_points(self, image_size: tuple[int, int], batch_size: int, device=None) -> list[Tensor]:
        """The anchor points (one ``[P, 4]`` box each) of every image; they depend only on the sizes, so they are
        built from empty float32 stand-ins (which also keeps them exact under mixed precision)."""
        image_list = ImageList(torch.empty((0, 0, *image_size), device=device), [tuple(image_size)] * batch_size)
        grids = [torch.empty((0, 0, *size), device=device) for size in self._level_sizes(image_size)]
        return self.fcos.anchor_generator(image_list, grids)

    def _host_anchor_points(self, image_size: tuple[int, int]) -> Tensor:
        """One image's anchor points on the host, made once per image size by a generator of their own: the model's
        generator moves its cell anchors to the device of each call, so host calls between forwards on a GPU would
        copy them to the host and back every step (two device syncs)."""
        if image_size not in self._host_anchors:
            generator = self.fcos.anchor_generator
            host_generator = AnchorGenerator(sizes=generator.sizes, aspect_ratios=generator.aspect_ratios)
            grids = [torch.empty((0, 0, *size)) for size in self._level_sizes(image_size)]
            self._host_anchors[image_size] = host_generator(ImageList(torch.empty((0, 0, *image_size)),
                                                                      [image_size]), grids)[0]
        return self._host_anchors[image_size]

    @torch.no_grad()
    def loss_normalizer(self, targets: list[dict[str, Tensor]], image_size: tuple[int, int]) -> Tensor:
        """What :meth:`loss` divides by for ``targets``: the positive points (an int64 scalar), found from the
        targets and the image size alone, before any forward."""
        image_size = tuple(image_size)
        all_boxes = [self._check_target(index, target)['boxes'] for index, target in enumerate(targets)]
        device = all_boxes[0].device if all_boxes else None  # the host, when the trainer counts
        anchors = self._host_anchor_points(image_size)
        if device is not None and anchors.device != device:  # targets already on the device
            anchors = anchors.to(device)
        per_level = [height * width for height, width in self._level_sizes(image_size)]
        positives = torch.zeros((), dtype=torch.int64, device=device)
        for boxes in all_boxes:
            positives += (match_points(anchors, boxes, per_level, self.fcos.center_sampling_radius) >= 0).sum()
        return positives

    def loss(self, outputs: dict[str, Any], targets: list[dict[str, Tensor]],
             normalizer: Tensor | None = None) -> dict[str, Tensor]:
        """FCOS losses against per-image dicts with ``boxes`` ``[N, 4]`` (XYXY, input pixels) and ``labels`` ``[N]``.

        Returns ``loss_cls`` (sigmoid focal), ``loss_bbox`` (GIoU) and ``loss_centerness`` (BCE), each summed over
        the points and divided by the number of positive points of the batch as in FCOS, or by ``normalizer`` (the
        trainer's count over every rank and micro-batch of the step: mmdet's ``reduce_mean(num_pos)``).
        """
        if len(targets) != len(outputs['anchors']):
            raise ValueError(f'{len(targets)} detection targets for a batch of {len(outputs["anchors"])} images')
        # with a normaliser the trainer's loss_normalizer has checked the labels on the host, before the copy
        clean_targets = [self._check_target(index, target, check_labels=normalizer is None)
                         for index, target in enumerate(targets)]
        head_outputs = {key: outputs[key].float() for key in ('cls_logits', 'bbox_regression', 'bbox_ctrness')}
        matched = [match_points(anchors, target['boxes'], outputs['num_anchors_per_level'],
                                self.fcos.center_sampling_radius)
                   for anchors, target in zip(outputs['anchors'], clean_targets)]
        sums, positives = fcos_loss_sums(clean_targets, head_outputs, outputs['anchors'], matched,
                                         self.fcos.box_coder)
        # FCOS divides each sum by this batch's positive points (at least 1); the normaliser replaces that count
        divisor = positives.clamp(min=1) if normalizer is None else normalizer
        return dict(loss_cls=sums['classification'] / divisor, loss_bbox=sums['bbox_regression'] / divisor,
                    loss_centerness=sums['bbox_ctrness'] / divisor)

    @torch.no_grad()
    def predict(self, outputs: dict[str, Any]) -> list[dict[str, Tensor]]:
        """Per image: ``boxes`` ``[D, 4]`` XYXY in input pixels, ``scores`` ``[D]``, ``labels`` ``[D]`` (0..K-1)."""
        counts = outputs['num_anchors_per_level']
        per_level = {key: list(outputs[key].float().split(counts, dim=1))
                     for key in ('cls_logits', 'bbox_regression', 'bbox_ctrness')}
        anchors = [list(anchors_per_image.split(counts)) for anchors_per_image in outputs['anchors']]
        return self.fcos.postprocess_detections(per_level, anchors, [outputs['image_size']] * len(anchors))

    def _check_target(self, index: int, target: dict[str, Tensor], check_labels: bool = True) -> dict[str, Tensor]:
        """The target's boxes (as a plain float tensor) and labels, after checking shapes and (``check_labels``) the
        label range, which reads the labels back: a host sync per image when they are on the GPU."""
        for key in ('boxes', 'labels'):
            if key not in target:
                raise KeyError(f'detection target {index} has no {key!r} (keys: {sorted(target)})')
        # BoundingBoxes is a Tensor subclass; torchvision's loss indexes and stacks it with plain tensors.
        boxes = target['boxes'].as_subclass(Tensor).float()
        labels = target['labels'].as_subclass(Tensor).long()
        if boxes.ndim != 2 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:1]:
            raise ValueError(f'detection target {index}: boxes must be [N, 4] and labels [N], got '
                             f'{list(boxes.shape)} and {list(labels.shape)}')
        if check_labels and labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
            raise ValueError(f'detection target {index}: labels {labels.tolist()} outside 0..{self.num_classes - 1}')
        return dict(boxes=boxes, labels=labels)


__all__ = ['FCOSHead', 'fcos_loss_sums', 'generalized_box_iou_loss', 'match_points']
