"""Images as real datasets hold them: grayscale, CMYK, alpha, 16-bit, EXIF-rotated, and very different sizes."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from mtvision.data import CocoDetectionDataset, DataError, SegmentationDataset
from mtvision.data.datasets.imagefolder import read_image
from mtvision.engine import Trainer

EXIF_ORIENTATION = 0x0112
ROTATE_90_CLOCKWISE = 6  # the tag a phone held upright writes: the stored pixels lie on their side


def rng_image(seed: int, shape: tuple, dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, np.iinfo(dtype).max, shape, endpoint=True, dtype=dtype)


def blocky_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Flat 8x8 blocks of random colours, so that a lossy JPEG keeps every pixel within a few levels."""
    blocks = rng_image(seed, (-(-height // 8), -(-width // 8), 3))
    return np.repeat(np.repeat(blocks, 8, 0), 8, 1)[:height, :width]


def save_pil(path: Path, array: np.ndarray, mode: str, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path, **options)


def write_gray8(path, size):
    gray = rng_image(1, size)
    save_pil(path, gray, 'L')
    return np.repeat(gray[None], 3, 0), 0


def write_gray16(path, size):  # PNG or TIFF, 16-bit samples: the high byte
    gray = rng_image(2, size, np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), gray)
    return np.repeat((gray >> 8).astype(np.uint8)[None], 3, 0), 0


def write_rgb16(path, size):
    rgb = rng_image(3, (*size, 3), np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), rgb[..., ::-1])  # OpenCV writes BGR
    return (rgb >> 8).astype(np.uint8).transpose(2, 0, 1), 0


def write_rgba(path, size):  # the colour under the alpha is kept, as PIL's convert('RGB') keeps it
    rgba = rng_image(4, (*size, 4))
    save_pil(path, rgba, 'RGBA')
    return rgba[..., :3].transpose(2, 0, 1), 0


def write_gray_alpha(path, size):
    la = rng_image(5, (*size, 2))
    save_pil(path, la, 'LA')
    return np.repeat(la[None, ..., 0], 3, 0), 0


def write_palette_with_transparency(path, size):
    indices = rng_image(6, size) % 4
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [30, 60, 90]], dtype=np.uint8)
    image = Image.fromarray(indices, 'P')
    image.putpalette(palette.reshape(-1).tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, transparency=0)  # palette entry 0 transparent (a tRNS chunk)
    return palette[indices].transpose(2, 0, 1), 0


def write_cmyk_jpeg(path, size):  # as Photoshop exports for print; libjpeg converts it back
    rgb = blocky_rgb(*size, seed=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(rgb)).convert('CMYK').save(path, quality=100)
    assert Image.open(path).mode == 'CMYK'
    return rgb.transpose(2, 0, 1), 4


def write_gray_jpeg(path, size):
    gray = blocky_rgb(*size, seed=8)[..., 0]
    save_pil(path, np.ascontiguousarray(gray), 'L', quality=100)
    return np.repeat(gray[None], 3, 0), 3


def write_exif_rotated(path, size):  # decoded as stored: the tag is ignored unless asked for
    rgb = blocky_rgb(*size, seed=9)
    image = Image.fromarray(np.ascontiguousarray(rgb))
    exif = image.getexif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CLOCKWISE
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, exif=exif, quality=100, subsampling=0)  # full-resolution colour: 8x8 blocks stay flat
    return rgb.transpose(2, 0, 1), 4


# file name -> writer (returning the expected [3, H, W] pixels and their tolerance), (height, width): sizes from a
# sliver to a photo, portrait and landscape, so that one dataset holds them all
KINDS = {
    'gray8.png': (write_gray8, (13, 300)),
    'gray16.png': (write_gray16, (300, 17)),
    'gray16.tif': (write_gray16, (9, 9)),
    'rgb16.png': (write_rgb16, (64, 64)),
    'rgb16.tiff': (write_rgb16, (200, 33)),
    'rgba.png': (write_rgba, (480, 640)),
    'gray_alpha.png': (write_gray_alpha, (6, 40)),
    'palette_transparent.png': (write_palette_with_transparency, (120, 7)),
    'cmyk.jpg': (write_cmyk_jpeg, (24, 40)),
    'gray.jpg': (write_gray_jpeg, (333, 111)),
    'exif_rotated.jpg': (write_exif_rotated, (16, 32)),
}


@pytest.mark.parametrize('name', KINDS)
def test_each_kind_decodes_to_rgb_uint8_with_the_expected_pixels(tmp_path, name):
    path = tmp_path / name
    write, size = KINDS[name]
    expected, tolerance = write(path, size)
    image = read_image(path)
    assert image.dtype == torch.uint8 and image.shape == expected.shape
    difference = np.abs(image.numpy().astype(int) - expected.astype(int))
    assert difference.max() <= tolerance, f'{name}: off by up to {difference.max()}'


def test_exif_orientation_is_applied_only_when_asked(tmp_path):
    path = tmp_path / 'photo.jpg'
    stored, tolerance = write_exif_rotated(path, (16, 32))
    turned = read_image(path, apply_exif_orientation=True).numpy()
    upright = np.rot90(stored, k=-1, axes=(1, 2))  # orientation 6: turn the stored pixels 90 degrees clockwise
    assert turned.shape == upright.shape == (3, 32, 16)
    assert np.abs(turned.astype(int) - upright.astype(int)).max() <= tolerance


def test_float_samples_are_refused_with_the_path(tmp_path):
    path = tmp_path / 'float.tif'
    cv2.imwrite(str(path), np.random.default_rng(0).random((4, 5, 3), dtype=np.float32))
    with pytest.raises(DataError, match=repr(str(path))):
        read_image(path, index=3)


def rotated_photo_with_object(path: Path, box: tuple[int, int, int, int], size: tuple[int, int]) -> None:
    """A JPEG whose stored pixels are black with a white ``box`` (x, y, w, h), tagged EXIF orientation 6."""
    height, width = size
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    x, y, w, h = box
    pixels[y:y + h, x:x + w] = 255
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CLOCKWISE
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, exif=exif, quality=100)


def test_coco_box_and_mask_stay_on_the_object_of_an_exif_rotated_photo(tmp_path):
    box, size = (24, 8, 16, 8), (32, 48)  # COCO's bbox and its image's (height, width): the stored grid
    rotated_photo_with_object(tmp_path / 'val2017' / '000000000042.jpg', box, size)
    x, y, w, h = box
    ann_file = tmp_path / 'annotations' / 'instances_val2017.json'
    ann_file.parent.mkdir()
    ann_file.write_text(json.dumps(dict(
        images=[dict(id=42, file_name='000000000042.jpg', height=size[0], width=size[1])],
        annotations=[dict(id=1, image_id=42, category_id=18, bbox=list(box), area=w * h, iscrowd=0,
                          segmentation=[[x, y, x + w, y, x + w, y + h, x, y + h]])],
        categories=[dict(id=18, name='dog', supercategory='animal')])))
    image, target = CocoDetectionDataset(tmp_path / 'val2017', ann_file)[0]
    assert image.shape == (3, *size)
    x0, y0, x1, y1 = target['boxes'][0].round().int().tolist()
    assert (x0, y0, x1, y1) == (x, y, x + w, y + h)
    inside = torch.zeros(size, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    assert image[:, inside].float().mean() > 240 and image[:, ~inside].float().mean() < 15
    mask = target['masks'][0].bool()
    assert image[:, mask].float().mean() > 240 and mask.sum() >= 0.8 * w * h
    # turned as the tag says, the photo no longer has the size the annotation file gives: a loader applying it
    # would fail the size check (a 180-degree tag would pass it with every box on the wrong object)
    assert read_image(tmp_path / 'val2017' / '000000000042.jpg', apply_exif_orientation=True).shape == (3, 48, 32)


def test_ade20k_label_map_stays_on_the_object_of_an_exif_rotated_photo(tmp_path):
    box, size = (4, 20, 10, 6), (40, 24)
    name = 'ADE_train_00000001'
    rotated_photo_with_object(tmp_path / 'images' / 'training' / f'{name}.jpg', box, size)
    labels = np.zeros(size, dtype=np.uint8)  # a label PNG carries no EXIF: it is on the stored grid
    x, y, w, h = box
    labels[y:y + h, x:x + w] = 5
    (tmp_path / 'annotations' / 'training').mkdir(parents=True)
    assert cv2.imwrite(str(tmp_path / 'annotations' / 'training' / f'{name}.png'), labels)
    image, label_map = SegmentationDataset(tmp_path / 'images' / 'training', tmp_path / 'annotations' / 'training',
                                           num_classes=150)[0]
    assert image.shape == (3, *size) and label_map.shape == size
    on_object = label_map == 5
    assert image[:, on_object].float().mean() > 240 and image[:, ~on_object].float().mean() < 15


def test_a_folder_mixing_every_kind_and_size_trains(tiny_config, tmp_path):
    """Every kind above, each at its own size, in one classification folder: two iterations of training with a
    Resize pipeline, each with a finite loss."""
    root = tmp_path / 'mixed'
    for index, (name, (write, size)) in enumerate(KINDS.items()):
        write(root / ('a' if index % 2 else 'b') / name, size)
    pipeline = [dict(type='Resize', size=(64, 64), antialias=True), dict(type='ToFloat'),
                dict(type='Normalize', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))]
    cfg = tiny_config(**{'train_cfg.max_iters': 2, 'checkpoint_cfg.save_last': False})
    task = cfg.tasks['cls']
    task.head.num_classes = 2
    task.train_dataset = dict(type='ImageFolderDataset', data_root=str(root), classes=['a', 'b'],
                              pipeline=pipeline)
    task.batch_size = 6  # two batches: a whole epoch (one permutation of the 11 files), so every kind is read
    cfg.tasks = {'cls': task}
    trainer = Trainer(cfg, tmp_path / 'run', validate=False)
    trainer.train()
    assert trainer.step == 2
    records = [json.loads(line) for line in (trainer.run_dir / 'scalars.jsonl').read_text().splitlines()]
    losses = [value for record in records for key, value in record.items() if key == 'loss/cls']
    assert len(losses) == 2 and all(np.isfinite(losses))
