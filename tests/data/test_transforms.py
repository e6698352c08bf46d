"""Joint transforms keep image, boxes, masks and depth aligned, and leave label dtypes alone."""
import pytest
import torch
from torchvision import tv_tensors

from mtvision.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_pipeline

GEOMETRIC = [dict(type='RandomResizedCrop', size=48, scale=(0.2, 1.0)), dict(type='RandomHorizontalFlip'),
             dict(type='RandomVerticalFlip')]


def interior(label_map: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3x3 neighbourhood holds one value: bilinear image and nearest labels must agree there."""
    padded = torch.nn.functional.pad(label_map[None, None].float(), (1, 1, 1, 1), mode='replicate')[0, 0]
    windows = padded.unfold(0, 3, 1).unfold(1, 3, 1)
    return (windows == label_map[..., None, None]).all(-1).all(-1)


@pytest.mark.parametrize('seed', range(10))
def test_segmentation_map_follows_the_image(seed):
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 10, (8, 8), generator=generator)
    labels = blocks.repeat_interleave(8, 0).repeat_interleave(8, 1)
    image = tv_tensors.Image((labels * 25).to(torch.uint8).expand(3, -1, -1).clone())
    torch.manual_seed(seed)
    out_image, out_labels = build_pipeline(GEOMETRIC + [dict(type='ToFloat')])(image, tv_tensors.Mask(labels))
    assert isinstance(out_labels, tv_tensors.Mask) and out_labels.dtype == torch.int64
    assert out_labels.shape == (48, 48) and out_image.shape == (3, 48, 48)
    assert set(out_labels.unique().tolist()) <= set(labels.unique().tolist()), 'nearest never invents labels'
    checked = interior(out_labels)
    assert checked.float().mean() > 0.5
    decoded = out_image[0] * 255 / 25
    assert (decoded[checked] - out_labels[checked]).abs().max() < 0.05


@pytest.mark.parametrize('seed', range(10))
def test_depth_follows_the_image(seed):
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing='ij')
    depth = 0.5 + 0.05 * xs + 0.02 * ys
    depth[:10] = 0  # invalid band, like the sky
    image = tv_tensors.Image(torch.stack([depth * 40, torch.zeros_like(depth), depth * 40]).round().to(torch.uint8))
    torch.manual_seed(seed)
    pipeline = build_pipeline(GEOMETRIC + [dict(type='ToFloat')])
    out_image, out_depth = pipeline(image, tv_tensors.Mask(depth[None]))
    assert out_depth.dtype == torch.float32 and out_depth.shape == (1, 48, 48)
    assert set(out_depth.unique().tolist()) <= set(depth.unique().tolist()), 'nearest never blends depths'
    valid = interior(out_depth[0] > 0) & (out_depth[0] > 0)
    assert valid.any()
    # image quantisation is 0.0125 m; a half-pixel shift between the two would add 0.035 m
    assert (out_image[0][valid] * 255 / 40 - out_depth[0][valid]).abs().max() < 0.05


def detection_sample(generator: torch.Generator):
    masks, boxes = [], []
    for _ in range(5):
        x1, y1 = torch.randint(0, 50, (2,), generator=generator).tolist()
        w, h = torch.randint(3, 20, (2,), generator=generator).tolist()
        mask = torch.zeros(64, 64, dtype=torch.uint8)
        mask[y1:y1 + h, x1:x1 + w] = 1
        boxes.append([x1, y1, min(x1 + w, 64), min(y1 + h, 64)])
        masks.append(mask)
    masks = torch.stack(masks)
    for index in range(len(masks)):  # later instances occlude earlier ones
        masks[:index][:, masks[index].bool()] = 0
    ids = torch.arange(1, len(masks) + 1)
    painted = (masks * ids[:, None, None]).sum(0) * 40
    image = tv_tensors.Image(painted.to(torch.uint8).expand(3, -1, -1).clone())
    target = dict(boxes=tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32), format='XYXY',
                                                 canvas_size=(64, 64)),
                  labels=ids, masks=tv_tensors.Mask(masks), image_id=0, orig_size=(64, 64))
    return image, target


@pytest.mark.parametrize('seed', range(10))
def test_boxes_masks_and_labels_move_together(seed):
    image, target = detection_sample(torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    pipeline = build_pipeline([dict(type='RandomResizedCrop', size=48, scale=(0.1, 1.0)),
                               dict(type='RandomHorizontalFlip'), dict(type='SanitizeBoundingBoxes')])
    out_image, out = pipeline(image, target)
    boxes, labels, masks = out['boxes'], out['labels'], out['masks']
    assert len(boxes) == len(labels) == len(masks) and masks.shape[1:] == (48, 48) and masks.dtype == torch.uint8
    assert out['image_id'] == 0 and out['orig_size'] == (64, 64)
    assert boxes.canvas_size == (48, 48)
    assert ((boxes[:, 2:] - boxes[:, :2]) >= 1).all(), 'degenerate boxes are dropped'
    assert (boxes >= 0).all() and (boxes[:, 0::2] <= 48).all() and (boxes[:, 1::2] <= 48).all(), 'boxes clipped'
    for box, label, mask in zip(boxes, labels, masks):
        rows, cols = torch.nonzero(mask, as_tuple=True)
        if len(rows):
            assert cols.min() >= box[0] - 1 and cols.max() + 1 <= box[2] + 1
            assert rows.min() >= box[1] - 1 and rows.max() + 1 <= box[3] + 1
        inside = interior(mask) & mask.bool()
        assert ((out_image[0][inside].float() / 40 - label).abs() < 0.05).all(), 'the mask covers its own pixels'


def test_cropped_away_instances_are_dropped_with_their_labels_and_masks():
    masks = torch.zeros(3, 64, 64, dtype=torch.uint8)
    masks[0, 0:6, 0:6] = 1  # in the corner the centre crop cuts away
    masks[1, 20:40, 20:30] = 1
    masks[2, 30:44, 34:50] = 1
    boxes = torch.tensor([[0, 0, 6, 6], [20, 20, 30, 40], [34, 30, 50, 44]], dtype=torch.float32)
    target = dict(boxes=tv_tensors.BoundingBoxes(boxes, format='XYXY', canvas_size=(64, 64)),
                  labels=torch.tensor([7, 8, 9]), masks=tv_tensors.Mask(masks))
    image = tv_tensors.Image(torch.zeros(3, 64, 64, dtype=torch.uint8))
    _, out = build_pipeline([dict(type='CenterCrop', size=32), dict(type='SanitizeBoundingBoxes')])(image, target)
    assert out['labels'].tolist() == [8, 9]
    assert out['boxes'].tolist() == [[4, 4, 14, 24], [18, 14, 32, 28]], 'shifted by 16 and clipped at 32'
    assert torch.equal(out['masks'], masks[1:, 16:48, 16:48])


def test_to_float_and_normalize_touch_the_image_only():
    image = tv_tensors.Image(torch.arange(3 * 4 * 4, dtype=torch.uint8).reshape(3, 4, 4))
    labels = tv_tensors.Mask(torch.arange(16).reshape(4, 4))
    pipeline = build_pipeline([dict(type='ToFloat'), dict(type='Normalize', mean=IMAGENET_MEAN, std=IMAGENET_STD)])
    out_image, out_labels = pipeline(image, labels)
    expected = (image.float() / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None,
                                                                                                             None]
    torch.testing.assert_close(out_image.as_subclass(torch.Tensor), expected)
    assert out_labels.dtype == torch.int64 and torch.equal(out_labels, labels)
    depth = tv_tensors.Mask(torch.full((1, 4, 4), 2.5))
    assert torch.equal(build_pipeline([dict(type='ToFloat')])(image, depth)[1], depth)


def test_build_pipeline_config_forms():
    image = tv_tensors.Image(torch.full((3, 6, 6), 9, dtype=torch.uint8))
    labels = tv_tensors.Mask(torch.ones(6, 6, dtype=torch.int64))
    assert build_pipeline([])(image, labels)[0] is image
    padded_image, padded_labels = build_pipeline(
        [dict(type='RandomCrop', size=10, pad_if_needed=True, fill=dict(Image=0, Mask=255))])(image, labels)
    assert (padded_labels == 255).sum() == 100 - 36 and (padded_labels == 1).sum() == 36
    assert (padded_image[:, padded_labels == 255] == 0).all() and (padded_image[:, padded_labels == 1] == 9).all()
    with pytest.raises(KeyError, match='Pixels'):
        build_pipeline([dict(type='Pad', padding=1, fill=dict(Pixels=0))])
    with pytest.raises(TypeError):
        build_pipeline(dict(type='ToFloat'))


@pytest.mark.parametrize('height, width, size, crop_pct', [(213, 301, 224, 0.875), (50, 70, 64, 0.9),
                                                           (90, 120, 32, 1.0), (120, 90, 48, 0.95)])
def test_resize_centre_crop_gives_timms_eval_pixels(height, width, size, crop_pct):
    import numpy as np
    import timm.data
    from PIL import Image

    rng = np.random.default_rng(size)
    # smooth noise (as photos are, mostly), both shrunk (213 x 301 -> 256) and enlarged (50 x 70 -> 71)
    array = np.asarray(Image.fromarray(rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)).resize(
        (width, height), Image.BILINEAR))
    timm_eval = timm.data.create_transform(input_size=(3, size, size), crop_pct=crop_pct, interpolation='bicubic',
                                           is_training=False)
    # timm's geometry, before its ToTensor and Normalize
    reference = np.asarray(timm_eval.transforms[1](timm_eval.transforms[0](Image.fromarray(array))))
    assert reference.shape == (size, size, 3)
    transform = build_pipeline([dict(type='ResizeCenterCrop', size=size, crop_pct=crop_pct)])
    assert transform.transforms[0].resize_size == int(size / crop_pct)  # floor, as timm's scale_size
    assert np.array_equal(np.asarray(transform(Image.fromarray(array))), reference)  # PIL in: PIL's own resize
    ours = transform(tv_tensors.Image(torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()))
    difference = np.abs(ours.permute(1, 2, 0).numpy().astype(int) - reference)
    # torch's uint8 antialiased bicubic is PIL's kernel in other fixed-point arithmetic: rounding apart, the same
    # (measured: at most 1 level, except 1 pixel of 12,288 off by 2 when enlarging)
    assert difference.max() <= 2 and (difference > 1).mean() < 1e-3 and difference.mean() < 0.02


def test_resize_centre_crop_arguments():
    from mtvision.data.transforms import ResizeCenterCrop

    assert ResizeCenterCrop(224, crop_pct=0.9).resize_size == 248  # timm's floor(248.9); round() would give 249
    assert ResizeCenterCrop(64, interpolation='bilinear').transforms[0].interpolation.value == 'bilinear'
    for kwargs, message in [(dict(size=(224, 224)), 'positive int'), (dict(size=224, crop_pct=0.0), r'\(0, 1\]'),
                            (dict(size=224, crop_pct=1.2), r'\(0, 1\]'), (dict(size=224, interpolation='cubic'),
                                                                           "one of .*'bicubic'.*got 'cubic'")]:
        with pytest.raises(ValueError, match=message):
            ResizeCenterCrop(**kwargs)
