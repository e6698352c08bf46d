"""Mask R-CNN instance segmentation head on a simple feature pyramid, with torchvision's Mask R-CNN doing the work."""
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import (RoIHeads, fastrcnn_loss, maskrcnn_inference, maskrcnn_loss,
                                                    paste_masks_in_image)
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import MultiScaleRoIAlign

from mtvision.models.backbones.base import BackboneOutput
from mtvision.models.necks import build_neck
from mtvision.registry import MODELS


def resize_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Mask probabilities ``[D, 1, h, w]`` at ``size`` (bilinear, ``align_corners=False``, float32); unchanged
    when already that size. How the metric and inference map the head's input-size masks to the original image."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks.float()
    if masks.shape[0] == 0:
        return masks.new_zeros((0, 1, *size), dtype=torch.float32)
    return F.interpolate(masks.float(), size=tuple(size), mode='bilinear', align_corners=False)


@MODELS.register_module()
class MaskRCNNHead(nn.Module):
    """Mask R-CNN (He et al., 2017) on a neck: torchvision's region proposal network and RoI heads with the mask
    branch, over the neck's pyramid (ViTDet's simple feature pyramid by default; Li et al., 2022, Sec. 4).

    torchvision's ``RegionProposalNetwork`` and ``RoIHeads`` compute their losses inside ``forward`` in training
    mode, and the second stage samples its RoIs from the targets. Here the two are split along the head contract:
    :meth:`forward` runs what needs no targets (the pyramid, the RPN's objectness and box deltas, the anchors and
    the proposals, which torchvision detaches), :meth:`loss` the rest with the targets (anchor assignment, RoI
    sampling with the ground-truth boxes added, box and mask branches and their losses) and :meth:`predict` the
    inference branch. Both call the torchvision modules' own steps in torchvision's order, so neither depends on
    the module's training flag except through the proposal counts (``rpn_pre_nms_top_n`` / ``rpn_post_nms_top_n``,
    training or testing values as torchvision picks them). No resizing transform runs: images reach the backbone
    already resized and normalised, all of one size.

    Labels are contiguous ``0..num_classes - 1`` outside the head; torchvision's class 0 is the background, so
    they are shifted by one inside. The proposal sampling reads counts back from the device (torchvision's
    ``nonzero`` and data-dependent shapes): unlike :class:`~mtvision.models.heads.detection.FCOSHead`, the loss
    syncs with the host.

    Args:
        num_classes: number of object classes (the background excluded).
        in_channels: channels of each backbone map.
        in_strides: stride of each backbone map.
        embed_dim: unused; every head is built with the backbone's width.
        neck: neck config, on top of :data:`mtvision.models.necks.DEFAULT_NECK`.
        anchor_sizes: anchor size per pyramid level, finest first; by default four times each level's stride
            (16, 32, 64 px for the default neck: the synthetic objects' 8-40 px; torchvision's FPN uses eight times).
        aspect_ratios: anchor aspect ratios (height / width), the same at every level.
        box_fc_dim: width of the two fully connected layers of the box branch (torchvision: 1024).
        mask_convs: 3x3 convolutions of the mask branch, each with the neck's width (Mask R-CNN: 4).
        rpn_pre_nms_top_n, rpn_post_nms_top_n: proposals kept per level before and per image after the RPN's NMS,
            ``dict(training=..., testing=...)`` (torchvision's FPN defaults).
        rpn_batch_size_per_image, box_batch_size_per_image: anchors and RoIs sampled per image for the losses.
        score_thresh: minimum score of a detection (low by default: COCO mAP rewards recall).
        nms_thresh: IoU above which NMS suppresses a box of the same class.
        detections_per_img: detections kept per image after NMS.
    """

    def __init__(self, num_classes: int, in_channels: Sequence[int], in_strides: Sequence[int],
                 embed_dim: int | None = None, neck: dict | None = None,
                 anchor_sizes: Sequence[int] | None = None, aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
                 box_fc_dim: int = 256, mask_convs: int = 4,
                 rpn_pre_nms_top_n: dict | None = None, rpn_post_nms_top_n: dict | None = None,
                 rpn_batch_size_per_image: int = 256, box_batch_size_per_image: int = 512,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f'MaskRCNNHead needs num_classes >= 1, got {num_classes}')
        self.neck = build_neck(neck, in_channels, in_strides)
        strides = list(self.neck.strides)
        anchor_sizes = [4 * stride for stride in strides] if anchor_sizes is None else list(anchor_sizes)
        if len(anchor_sizes) != len(strides):
            raise ValueError(f'anchor_sizes {tuple(anchor_sizes)} must give one size per neck level '
                             f'(strides {tuple(strides)})')
        if min(anchor_sizes) < 2:
            # torchvision rounds anchor corners to integers, which turns a size-1 anchor into an empty box.
            raise ValueError(f'anchor_sizes must be at least 2, got {tuple(anchor_sizes)}')
        self.num_classes = num_classes
        channels = self.neck.out_channels
        level_names = [str(index) for index in range(len(strides))]  # the neck's OrderedDict keys
        anchor_generator = AnchorGenerator(sizes=tuple((size,) for size in anchor_sizes),
                                           aspect_ratios=(tuple(aspect_ratios),) * len(anchor_sizes))
        self.rpn = RegionProposalNetwork(
            anchor_generator, RPNHead(channels, anchor_generator.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=rpn_batch_size_per_image,
            positive_fraction=0.5, pre_nms_top_n=dict(rpn_pre_nms_top_n or dict(training=2000, testing=1000)),
            post_nms_top_n=dict(rpn_post_nms_top_n or dict(training=2000, testing=1000)), nms_thresh=0.7)
        self.roi_heads = RoIHeads(
            box_roi_pool=MultiScaleRoIAlign(level_names, output_size=7, sampling_ratio=2),
            box_head=TwoMLPHead(channels * 7 * 7, box_fc_dim),
            box_predictor=FastRCNNPredictor(box_fc_dim, num_classes + 1),
            fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=box_batch_size_per_image,
            positive_fraction=0.25, bbox_reg_weights=None, score_thresh=score_thresh, nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            mask_roi_pool=MultiScaleRoIAlign(level_names, output_size=14, sampling_ratio=2),
            mask_head=MaskRCNNHeads(channels, [channels] * mask_convs, dilation=1),
            mask_predictor=MaskRCNNPredictor(channels, channels, num_classes + 1))

    def forward(self, features: BackboneOutput) -> dict[str, Any]:
        """The pyramid and the first stage.

        Returns:
            dict with ``levels`` (the pyramid, an OrderedDict of NCHW maps), ``objectness`` ``[B*A, 1]`` and
            ``rpn_deltas`` ``[B*A, 4]`` over the ``A`` anchors of all levels, ``anchors`` (one ``[A, 4]`` per image),
            ``proposals`` (one ``[R, 4]`` per image, detached) and ``image_size`` ``(H, W)``.
        """
        levels: OrderedDict[str, Tensor] = self.neck(features.maps)
        maps = list(levels.values())
        image_size = tuple(features.image_size)
        batch_size = maps[0].shape[0]
        objectness, deltas = self.rpn.head(maps)
        # float32 stand-ins: the anchors depend on the sizes only, and stay exact under mixed precision
        image_list = ImageList(torch.empty((0, 0, *image_size), device=maps[0].device), [image_size] * batch_size)
        grids = [torch.empty((0, 0, *level.shape[-2:]), device=level.device) for level in maps]
        anchors = self.rpn.anchor_generator(image_list, grids)
        anchors_per_level = [o[0].numel() for o in objectness]  # anchors x height x width
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = self.rpn.box_coder.decode(deltas.detach().float(), anchors).view(batch_size, -1, 4)
        proposals, _ = self.rpn.filter_proposals(proposals, objectness.detach().float(), image_list.image_sizes,
                                                 anchors_per_level)
        return dict(levels=levels, objectness=objectness, rpn_deltas=deltas, anchors=anchors, proposals=proposals,
                    image_size=image_size)

    def loss(self, outputs: dict[str, Any], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Mask R-CNN's five losses against per-image dicts with ``boxes`` ``[N, 4]`` (XYXY, input pixels),
        ``labels`` ``[N]`` (``0..num_classes - 1``) and ``masks`` ``[N, H, W]`` (uint8, input pixels).

        Returns ``loss_objectness`` and ``loss_rpn_box_reg`` (the RPN's BCE and smooth L1 over its sampled anchors),
        ``loss_classifier`` and ``loss_box_reg`` (the box branch's cross-entropy and smooth L1 over the sampled
        RoIs) and ``loss_mask`` (per-pixel BCE of the true class's mask over the positive RoIs), as torchvision
        computes them.
        """
        if len(targets) != len(outputs['anchors']):
            raise ValueError(f'{len(targets)} instance segmentation targets for a batch of '
                             f'{len(outputs["anchors"])} images')
        targets = [self._check_target(index, target, outputs['image_size']) for index, target in enumerate(targets)]
        rpn = self.rpn
        anchor_labels, matched_boxes = rpn.assign_targets_to_anchors(outputs['anchors'], targets)
        regression_targets = rpn.box_coder.encode(matched_boxes, outputs['anchors'])
        loss_objectness, loss_rpn_box_reg = rpn.compute_loss(outputs['objectness'].float(),
                                                             outputs['rpn_deltas'].float(), anchor_labels,
                                                             regression_targets)

        # the second stage as RoIHeads.forward trains it: RoIs sampled from the proposals and the true boxes
        roi_heads, levels = self.roi_heads, outputs['levels']
        image_sizes = [outputs['image_size']] * len(targets)
        rois, matched, roi_labels, roi_targets = roi_heads.select_training_samples(list(outputs['proposals']),
                                                                                   targets)
        class_logits, box_regression = roi_heads.box_predictor(
            roi_heads.box_head(roi_heads.box_roi_pool(levels, rois, image_sizes)))
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits.float(), box_regression.float(), roi_labels,
                                                      roi_targets)
        positives = [torch.where(labels > 0)[0] for labels in roi_labels]
        mask_rois = [image_rois[index] for image_rois, index in zip(rois, positives)]
        mask_logits = roi_heads.mask_predictor(roi_heads.mask_head(roi_heads.mask_roi_pool(levels, mask_rois,
                                                                                           image_sizes)))
        loss_mask = maskrcnn_loss(mask_logits.float(), mask_rois, [target['masks'] for target in targets],
                                  [target['labels'] for target in targets],
                                  [image_matched[index] for image_matched, index in zip(matched, positives)])
        return dict(loss_objectness=loss_objectness, loss_rpn_box_reg=loss_rpn_box_reg,
                    loss_classifier=loss_classifier, loss_box_reg=loss_box_reg, loss_mask=loss_mask)

    @torch.no_grad()
    def predict(self, outputs: dict[str, Any]) -> list[dict[str, Tensor]]:
        """Per image: ``boxes`` ``[D, 4]`` XYXY in input pixels, ``scores`` ``[D]``, ``labels`` ``[D]``
        (``0..num_classes - 1``) and ``masks`` ``[D, 1, H, W]``: each detection's mask probabilities pasted into
        the input image (torchvision's ``paste_masks_in_image``; threshold at 0.5 for a binary mask)."""
        roi_heads, levels, image_size = self.roi_heads, outputs['levels'], outputs['image_size']
        proposals = list(outputs['proposals'])
        image_sizes = [image_size] * len(proposals)
        class_logits, box_regression = roi_heads.box_predictor(
            roi_heads.box_head(roi_heads.box_roi_pool(levels, proposals, image_sizes)))
        boxes, scores, labels = roi_heads.postprocess_detections(class_logits.float(), box_regression.float(),
                                                                 proposals, image_sizes)
        mask_logits = roi_heads.mask_predictor(roi_heads.mask_head(roi_heads.mask_roi_pool(levels, boxes,
                                                                                           image_sizes)))
        mask_probs = maskrcnn_inference(mask_logits.float(), labels)
        return [dict(boxes=image_boxes, scores=image_scores, labels=image_labels - 1,
                     masks=paste_masks_in_image(probs, image_boxes, image_size))
                for image_boxes, image_scores, image_labels, probs in zip(boxes, scores, labels, mask_probs)]

    def _check_target(self, index: int, target: dict[str, Tensor], image_size: tuple[int, int]) -> dict[str, Tensor]:
        """torchvision's target: plain float boxes, labels shifted past the background, masks; after checking the
        keys, the shapes and the label range (which reads the labels back: a host sync per image on the GPU)."""
        for key in ('boxes', 'labels', 'masks'):
            if key not in target:
                raise KeyError(f'instance segmentation target {index} has no {key!r} (keys: {sorted(target)})')
        # BoundingBoxes and Mask are Tensor subclasses; torchvision's losses index and stack them with plain tensors
        boxes = target['boxes'].as_subclass(Tensor).float()
        labels = target['labels'].as_subclass(Tensor).long()
        masks = target['masks'].as_subclass(Tensor)
        if boxes.ndim != 2 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:1]:
            raise ValueError(f'instance segmentation target {index}: boxes must be [N, 4] and labels [N], got '
                             f'{list(boxes.shape)} and {list(labels.shape)}')
        if masks.shape != (len(boxes), *image_size):
            raise ValueError(f'instance segmentation target {index}: masks must be [N, H, W] = '
                             f'{[len(boxes), *image_size]} (one per box, at the input size), got {list(masks.shape)}')
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
            raise ValueError(f'instance segmentation target {index}: labels {labels.tolist()} outside '
                             f'0..{self.num_classes - 1}')
        return dict(boxes=boxes, labels=labels + 1, masks=masks)


__all__ = ['MaskRCNNHead', 'resize_masks']
