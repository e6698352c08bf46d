"""COCO-format object detection and instance segmentation."""
import contextlib
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors

from mtvision.data.datasets.imagefolder import read_image
from mtvision.data.errors import DataError
from mtvision.data.transforms import build_pipeline
from mtvision.registry import DATASETS

__all__ = ['CocoDetectionDataset']


@DATASETS.register_module()
class CocoDetectionDataset(Dataset):
    """Images listed in a COCO annotation file, returning ``(image, target)``.

    ``target`` holds ``boxes`` (``BoundingBoxes`` XYXY float, clipped to the image), ``labels`` (int64,
    contiguous: label ``i`` is category id ``cat_ids[i]``), ``masks`` (``Mask`` uint8 [N, H, W], decoded from
    polygons or RLE; only with ``with_masks``), ``image_id`` and ``orig_size`` ``(h, w)``. Crowd annotations
    (``iscrowd=1``) are left out of the targets: they mark regions, not instances to detect, and the COCO
    metric reads them from :attr:`coco` itself. Images without annotations are kept.

    Args:
        img_dir: folder the images' ``file_name`` entries are relative to.
        ann_file: COCO instances JSON.
        pipeline: transform configs or a built transform; include ``SanitizeBoundingBoxes`` after crops.
        with_masks: decode instance masks.

    Attributes:
        coco: the ``pycocotools.coco.COCO`` index of ``ann_file``.
        cat_ids: category ids sorted ascending; position = contiguous label.
        classes: category names in label order.
        num_classes: number of categories.
        img_ids: image ids in sample order (ascending).
    """

    def __init__(self, img_dir: str | os.PathLike, ann_file: str | os.PathLike,
                 pipeline: Sequence[dict] | Callable = (), with_masks: bool = True):
        self.img_dir = Path(img_dir)
        self.ann_file = Path(ann_file)
        self.with_masks = with_masks
        self.pipeline = build_pipeline(pipeline)
        self.coco = self._load_index()
        self.cat_ids = sorted(self.coco.cats)
        self.cat2label = {cat_id: label for label, cat_id in enumerate(self.cat_ids)}
        self.classes = [self.coco.cats[cat_id].get('name', str(cat_id)) for cat_id in self.cat_ids]
        self.num_classes = len(self.cat_ids)
        self.img_ids = sorted(self.coco.imgs)
        self._check_annotations()

    def _load_index(self) -> COCO:
        try:
            dataset = json.loads(self.ann_file.read_text())
        except OSError as error:
            raise DataError(f'cannot read annotation file ({error.strerror or error})', self.ann_file) from error
        except ValueError as error:
            raise DataError(f'annotation file is not valid JSON ({error})', self.ann_file) from error
        if not isinstance(dataset, dict) or not isinstance(dataset.get('images'), list) \
                or not isinstance(dataset.get('categories'), list):
            raise DataError('not a COCO annotation file: needs "images" and "categories" lists', self.ann_file)
        dataset.setdefault('annotations', [])
        for kind in ('images', 'categories'):
            ids = [entry.get('id') for entry in dataset[kind]]
            if len(set(ids)) != len(ids):
                duplicate = next(i for i, entry_id in enumerate(ids) if ids.index(entry_id) != i)
                raise DataError(f'{kind} entry {duplicate} repeats id {ids[duplicate]}', self.ann_file, duplicate)
        coco = COCO()
        coco.dataset = dataset
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
            coco.createIndex()
        return coco

    def _check_annotations(self) -> None:
        """Checks that need no pixels, so that bad annotations fail before training starts."""
        for index, image in enumerate(self.coco.dataset['images']):
            path = self.img_dir / str(image.get('file_name', ''))
            if not path.is_file():
                raise DataError(f'image entry {index} (id {image["id"]}) names a missing file {str(path)!r}',
                                self.ann_file, index)
        for index, annotation in enumerate(self.coco.dataset['annotations']):
            where = f'annotation {index} (id {annotation.get("id")})'
            if annotation.get('image_id') not in self.coco.imgs:
                raise DataError(f'{where}: image_id {annotation.get("image_id")} is not in images',
                                self.ann_file, index)
            if annotation.get('category_id') not in self.cat2label:
                raise DataError(f'{where}: category_id {annotation.get("category_id")} is not in categories '
                                f'{self.cat_ids}', self.ann_file, index)
            bbox = annotation.get('bbox')
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                raise DataError(f'{where}: bbox must be [x, y, w, h], got {bbox!r}', self.ann_file, index)
            if not annotation.get('iscrowd', 0) and (bbox[2] <= 0 or bbox[3] <= 0):
                raise DataError(f'{where}: box with non-positive size, bbox {bbox}', self.ann_file, index)

    def __len__(self) -> int:
        return len(self.img_ids)

    def __getitem__(self, index: int):
        image_id = self.img_ids[index]
        info = self.coco.imgs[image_id]
        path = self.img_dir / info['file_name']
        image = read_image(path, index)
        height, width = image.shape[-2:]
        if (info.get('height', height), info.get('width', width)) != (height, width):
            raise DataError(f'image is {height}x{width} but {self.ann_file} says {info["height"]}x{info["width"]}',
                            path, index)
        annotations = [annotation for annotation in self.coco.imgToAnns[image_id] if not annotation.get('iscrowd', 0)]
        boxes = torch.tensor([annotation['bbox'] for annotation in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        target = dict(
            boxes=tv_tensors.BoundingBoxes(boxes, format='XYXY', canvas_size=(height, width)),
            labels=torch.tensor([self.cat2label[annotation['category_id']] for annotation in annotations],
                                dtype=torch.int64),
        )
        if self.with_masks:
            target['masks'] = tv_tensors.Mask(self._decode_masks(annotations, height, width, index))
        target.update(image_id=int(image_id), orig_size=(int(height), int(width)))
        return self.pipeline(image, target)

    def _decode_masks(self, annotations: list[dict], height: int, width: int, index: int) -> torch.Tensor:
        rles = []
        for annotation in annotations:
            try:
                rles.append(self.coco.annToRLE(annotation))
            except Exception as error:  # pycocotools raises assorted types for malformed polygons and RLE
                raise DataError(f'annotation id {annotation.get("id")} of image id {annotation["image_id"]}: '
                                f'cannot decode segmentation ({type(error).__name__}: {error})',
                                self.ann_file, index) from error
        if not rles:
            return torch.zeros((0, height, width), dtype=torch.uint8)
        return torch.from_numpy(np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1)))
