"""COCO-format object detection and instance segmentation."""
import contextlib
import io
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors

from mtvision.data.collate import Sample
from mtvision.data.datasets.imagefolder import read_image
from mtvision.data.errors import DataError, DataProblems
from mtvision.data.transforms import build_pipeline
from mtvision.registry import DATASETS

__all__ = ['CocoDetectionDataset']


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@DATASETS.register_module()
class CocoDetectionDataset(Dataset):
    """Images listed in a COCO annotation file, returning ``(image, target)``.

    ``target`` holds ``boxes`` (``BoundingBoxes`` XYXY float, clipped to the image), ``labels`` (int64,
    contiguous: label ``i`` is category id ``cat_ids[i]``), ``masks`` (``Mask`` uint8 [N, H, W], decoded from
    polygons or RLE; only with ``with_masks``), ``image_id`` and ``orig_size`` ``(h, w)``. Crowd annotations
    (``iscrowd=1``) are left out of the targets: they mark regions, not instances to detect, and the COCO
    metric reads them from :attr:`coco` itself. Images without annotations are kept. Images are read as stored,
    their EXIF orientation tag ignored: COCO's boxes, polygons and ``height``/``width`` describe the stored pixel
    grid (torchvision's ``CocoDetection`` and pycocotools' demo read it so too).

    Args:
        img_dir: folder the images' ``file_name`` entries are relative to.
        ann_file: COCO instances JSON.
        pipeline: transform configs or a built transform; include ``SanitizeBoundingBoxes`` after crops.
        with_masks: decode instance masks.
        errors: ``'raise'``: the first bad image entry or annotation raises DataError; ``'collect'``: every
            problem is kept in :attr:`problems`, and images whose file is missing and bad annotations are left out
            (used by the data audit).

    Attributes:
        coco: the ``pycocotools.coco.COCO`` index of ``ann_file`` (without the left-out annotations).
        cat_ids: category ids sorted ascending; position = contiguous label.
        classes: category names in label order.
        num_classes: number of categories.
        img_ids: image ids in sample order (ascending).
        problems: the problems found while indexing: boxes reaching more than a pixel past their image
            (warnings), and with ``errors='collect'`` every error.

    DataError indices: the position in ``images`` or ``annotations`` for problems of an entry of the file; the
    sample index (rank of the image id among all image ids, even when ``errors='collect'`` left images out) for
    problems found when a sample is read.
    """

    def __init__(self, img_dir: str | os.PathLike, ann_file: str | os.PathLike,
                 pipeline: Sequence[dict] | Callable = (), with_masks: bool = True, errors: str = 'raise'):
        self.img_dir = Path(img_dir)
        self.ann_file = Path(ann_file)
        self.with_masks = with_masks
        self.pipeline = build_pipeline(pipeline)
        problems = DataProblems(errors)
        self.problems = problems.found
        self.coco, missing = self._load_index(problems)
        self.cat_ids = sorted(self.coco.cats)
        self.cat2label = {cat_id: label for label, cat_id in enumerate(self.cat_ids)}
        self.classes = [self.coco.cats[cat_id].get('name', str(cat_id)) for cat_id in self.cat_ids]
        self.num_classes = len(self.cat_ids)
        all_ids = sorted(self.coco.imgs)
        self.img_ids = [image_id for image_id in all_ids if image_id not in missing]
        # sample index of each image among all images, when images were left out (None: the sample index itself)
        self._entry_indices = (np.asarray([rank for rank, image_id in enumerate(all_ids) if image_id not in missing],
                                          dtype=np.int64) if missing else None)

    def _load_index(self, problems: DataProblems) -> tuple[COCO, set]:
        """The COCO index without the annotations that failed a check, and the ids of images whose file is
        missing (both empty unless ``errors='collect'``)."""
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
        for kind in ('images', 'categories', 'annotations'):
            if not all(isinstance(entry, dict) for entry in dataset[kind]):
                index = next(i for i, entry in enumerate(dataset[kind]) if not isinstance(entry, dict))
                raise DataError(f'{kind} entry {index} is not an object: {dataset[kind][index]!r}', self.ann_file,
                                index)
        for kind in ('images', 'categories'):
            ids = [entry.get('id') for entry in dataset[kind]]
            if len(set(ids)) != len(ids):
                duplicate = next(i for i, entry_id in enumerate(ids) if ids.index(entry_id) != i)
                raise DataError(f'{kind} entry {duplicate} repeats id {ids[duplicate]}', self.ann_file, duplicate)
        # checks that need no pixels, so that bad annotations fail before training starts
        missing = set()
        for index, image in enumerate(dataset['images']):
            if problems.report(self._image_problems(index, image)):
                missing.add(image.get('id'))
        images = {image['id']: image for image in dataset['images']}
        category_ids = {category['id'] for category in dataset['categories']}
        kept = [annotation for index, annotation in enumerate(dataset['annotations'])
                if not problems.report(self._annotation_problems(index, annotation, images, category_ids))]
        if len(kept) < len(dataset['annotations']):
            dataset['annotations'] = kept
        coco = COCO()
        coco.dataset = dataset
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
            coco.createIndex()
        return coco, missing

    def _image_problems(self, index: int, image: dict) -> Iterator[DataError]:
        path = self.img_dir / str(image.get('file_name', ''))
        if not path.is_file():
            yield DataError(f'image entry {index} (id {image.get("id")}) names a missing file {str(path)!r}',
                            self.ann_file, index)

    def _annotation_problems(self, index: int, annotation: dict, images: dict[int, dict],
                             category_ids: set) -> Iterator[DataError]:
        """The checks of one annotation, in the order raise mode reports them."""
        where = f'annotation {index} (id {annotation.get("id")})'
        image = images.get(annotation.get('image_id'))
        if image is None:
            yield DataError(f'{where}: image_id {annotation.get("image_id")} is not in images', self.ann_file, index)
        if annotation.get('category_id') not in category_ids:
            yield DataError(f'{where}: category_id {annotation.get("category_id")} is not in categories '
                            f'{sorted(category_ids)}', self.ann_file, index)
        bbox = annotation.get('bbox')
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_finite_number(v) for v in bbox):
            yield DataError(f'{where}: bbox must be [x, y, w, h] of finite numbers, got {bbox!r}', self.ann_file,
                            index)
            return
        x, y, w, h = bbox
        if not annotation.get('iscrowd', 0) and (w <= 0 or h <= 0):
            yield DataError(f'{where}: box with non-positive size, bbox {bbox}', self.ann_file, index)
            return
        width, height = (image or {}).get('width'), (image or {}).get('height')
        if not (_is_finite_number(width) and _is_finite_number(height)):
            return
        # what __getitem__ does with the box: clamped to the image, dropped when nothing of it is left
        if x >= width or y >= height or x + w <= 0 or y + h <= 0:
            yield DataError(f'{where}: box {bbox} lies entirely outside its {height}x{width} image: dropped in '
                            f'training', self.ann_file, index, level='warning')
        # one pixel of slack: tight boxes of masks touching the border, rounded, may end a fraction past it
        elif x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
            yield DataError(f'{where}: box {bbox} reaches more than a pixel outside its {height}x{width} image: '
                            f'clipped to it in training', self.ann_file, index, level='warning')

    def __len__(self) -> int:
        return len(self.img_ids)

    def __getitem__(self, index: int):
        image_id = self.img_ids[index]
        if self._entry_indices is not None:
            index = int(self._entry_indices[index])
        info = self.coco.imgs[image_id]
        path = self.img_dir / info['file_name']
        # the stored pixel grid, which the boxes and polygons refer to (and `height`/`width` describe)
        image = read_image(path, index, apply_exif_orientation=False)
        height, width = image.shape[-2:]
        stated = (info.get('height', height), info.get('width', width))
        if stated != (height, width):
            raise DataError(f'image is {height}x{width} but {self.ann_file} says {stated[0]}x{stated[1]}', path, index)
        annotations = [annotation for annotation in self.coco.imgToAnns[image_id] if not annotation.get('iscrowd', 0)]
        boxes = torch.tensor([annotation['bbox'] for annotation in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        # a box entirely outside the image is empty once clamped: nothing to learn or find (the audit warns of it)
        inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        annotations = [annotation for annotation, kept in zip(annotations, inside.tolist()) if kept]
        boxes = boxes[inside]
        target = dict(
            boxes=tv_tensors.BoundingBoxes(boxes, format='XYXY', canvas_size=(height, width)),
            labels=torch.tensor([self.cat2label[annotation['category_id']] for annotation in annotations],
                                dtype=torch.int64),
        )
        if self.with_masks:
            target['masks'] = tv_tensors.Mask(self._decode_masks(annotations, height, width, index))
        target.update(image_id=int(image_id), orig_size=(int(height), int(width)))
        return Sample(*self.pipeline(image, target), path)

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


@DATASETS.register_module()
class CocoMultiLabelDataset(CocoDetectionDataset):
    """Multi-label classification from COCO instances: ``(image, FloatTensor[K])``, the multi-hot set of the
    categories an image's annotations belong to (crowd regions included: they show the category too), as the
    multi-label COCO benchmark derives its labels from ``instances_*.json`` (ML-GCN, Chen et al. 2019; ASL, Ridnik
    et al. 2021). The annotation file is indexed and checked as :class:`CocoDetectionDataset` does; only the image
    goes through ``pipeline``. ``classes`` are the category names in label order."""

    def __init__(self, img_dir: str | os.PathLike, ann_file: str | os.PathLike,
                 pipeline: Sequence[dict] | Callable = (), errors: str = 'raise'):
        super().__init__(img_dir, ann_file, pipeline, with_masks=False, errors=errors)

    def target(self, index: int) -> torch.Tensor:
        """Sample ``index``'s multi-hot float32 [K] target."""
        multi_hot = torch.zeros(self.num_classes, dtype=torch.float32)
        labels = {self.cat2label[annotation['category_id']] for annotation in self.coco.imgToAnns[self.img_ids[index]]}
        multi_hot[sorted(labels)] = 1
        return multi_hot

    def __getitem__(self, index: int):
        entry = index if self._entry_indices is None else int(self._entry_indices[index])
        path = self.img_dir / self.coco.imgs[self.img_ids[index]]['file_name']
        return Sample(self.pipeline(read_image(path, entry)), self.target(index), path)
