"""COCO 2017 as unpacked: ``{train,val}2017/*.jpg`` and ``annotations/instances_{train,val}2017.json`` with the
real files' keys, read, trained and evaluated through the real-data config's COCO task, and audited."""
import copy
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from mmengine.config import Config

from mtvision.data import CocoDetectionDataset
from mtvision.engine import Trainer

ROOT = Path(__file__).resolve().parents[2]
REAL_DATASETS = ROOT / 'configs' / '_base_' / 'datasets' / 'real_4task_224px.py'
# a few of COCO's 80 categories with their real ids (1..90, with gaps) and supercategories
CATEGORIES = [dict(supercategory='person', id=1, name='person'), dict(supercategory='vehicle', id=2, name='bicycle'),
              dict(supercategory='animal', id=18, name='dog'), dict(supercategory='kitchen', id=44, name='bottle'),
              dict(supercategory='indoor', id=90, name='toothbrush')]
# split -> image id -> (height, width), [(category id, x, y, w, h, iscrowd)]; boxes are painted as filled shapes
SCENES = {
    'train': {
        9: ((48, 64), [(18, 4, 6, 20, 14, 0), (1, 36, 20, 18, 24, 0)]),
        25: ((80, 40), [(90, 10, 50, 12, 20, 0)]),
        30: ((40, 72), []),  # no annotations: kept, a picture of background
        34: ((56, 56), [(44, 30, 4, 16, 40, 0), (1, 2, 30, 40, 20, 1)]),  # one crowd region
    },
    'val': {
        139: ((48, 64), [(18, 20, 10, 24, 20, 0), (2, 2, 2, 10, 10, 0)]),
        285: ((64, 48), [(1, 8, 8, 30, 40, 0)]),
        632: ((40, 40), []),
    },
}
SIZE = 64
NORMALIZE = [dict(type='ToFloat'), dict(type='Normalize', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))]


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd format: run lengths of the column-major mask, starting with a run of zeros."""
    flat = mask.flatten(order='F')
    changes = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat[0]:
        counts = [0] + counts
    return dict(counts=counts, size=list(mask.shape))


def write_coco(root: Path) -> Path:
    """COCO 2017 as unpacked under ``root``; returns ``root``."""
    annotation_id = 1
    for split, scenes in SCENES.items():
        images, annotations = [], []
        for image_id, ((height, width), objects) in scenes.items():
            file_name = f'{image_id:012d}.jpg'
            pixels = np.full((height, width, 3), 40, dtype=np.uint8)
            for category_id, x, y, w, h, iscrowd in objects:
                pixels[y:y + h, x:x + w] = (category_id * 50) % 256, 200, 255 - category_id
                if iscrowd:
                    mask = np.zeros((height, width), dtype=np.uint8)
                    mask[y:y + h, x:x + w] = 1
                    segmentation = uncompressed_rle(mask)
                else:
                    segmentation = [[x, y, x + w, y, x + w, y + h, x, y + h]]
                annotations.append(dict(segmentation=segmentation, area=float(w * h), iscrowd=iscrowd,
                                        image_id=image_id, bbox=[float(x), float(y), float(w), float(h)],
                                        category_id=category_id, id=annotation_id))
                annotation_id += 1
            (root / f'{split}2017').mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(root / f'{split}2017' / file_name), pixels)
            images.append(dict(license=3, file_name=file_name,
                               coco_url=f'http://images.cocodataset.org/{split}2017/{file_name}', height=height,
                               width=width, date_captured='2013-11-14 16:28:13',
                               flickr_url='http://farm3.staticflickr.com/2/0_0_z.jpg', id=image_id))
        content = dict(
            info=dict(description='COCO 2017 Dataset', url='http://cocodataset.org', version='1.0', year=2017,
                      contributor='COCO Consortium', date_created='2017/09/01'),
            licenses=[dict(url='http://creativecommons.org/licenses/by-nc-sa/2.0/', id=3,
                           name='Attribution-NonCommercial-ShareAlike License')],
            images=images, annotations=annotations, categories=CATEGORIES)
        (root / 'annotations').mkdir(exist_ok=True)
        (root / 'annotations' / f'instances_{split}2017.json').write_text(json.dumps(content))
    return root


@pytest.fixture
def coco_root(tmp_path) -> Path:
    return write_coco(tmp_path / 'data' / 'coco')


def coco_task(coco_root: Path) -> dict:
    """The real-data config's COCO task, unchanged but for its paths (moved to ``coco_root``), a 64-pixel
    pipeline, the replica's 5 classes and small batches."""
    task = copy.deepcopy(Config.fromfile(str(REAL_DATASETS))._coco_task.to_dict())
    for split in ('train', 'val'):
        dataset = task[f'{split}_dataset']
        for key in ('img_dir', 'ann_file'):
            assert dataset[key].startswith('data/coco/'), 'the README layout: data/coco/...'
            dataset[key] = str(coco_root / dataset[key][len('data/coco/'):])
    task['train_dataset']['pipeline'] = [dict(type='Resize', size=(SIZE, SIZE), antialias=True),
                                         dict(type='RandomHorizontalFlip'), dict(type='SanitizeBoundingBoxes')]
    task['train_dataset']['pipeline'] += NORMALIZE
    task['val_dataset']['pipeline'] = [dict(type='Resize', size=(SIZE, SIZE), antialias=True)] + NORMALIZE
    task['head']['num_classes'] = len(CATEGORIES)
    task.update(batch_size=2, val_batch_size=2, num_workers=0)
    return task


def test_the_unpacked_layout_reads_with_contiguous_labels_crowds_left_out_and_empty_images_kept(coco_root):
    dataset = CocoDetectionDataset(coco_root / 'train2017', coco_root / 'annotations' / 'instances_train2017.json')
    assert dataset.cat_ids == [1, 2, 18, 44, 90] and dataset.num_classes == 5
    assert dataset.classes == ['person', 'bicycle', 'dog', 'bottle', 'toothbrush']
    assert dataset.img_ids == [9, 25, 30, 34], 'images without annotations are kept'
    for index, image_id in enumerate(dataset.img_ids):
        (height, width), objects = SCENES['train'][image_id]
        image, target = dataset[index]
        assert image.shape == (3, height, width) and target['image_id'] == image_id
        kept = [row for row in objects if not row[5]]  # crowd regions are not instances to learn
        assert target['labels'].tolist() == [dataset.cat_ids.index(row[0]) for row in kept]
        assert target['boxes'].tolist() == [[x, y, x + w, y + h] for _, x, y, w, h, _ in kept]
        for mask, (_, x, y, w, h, _) in zip(target['masks'], kept):
            expected = np.zeros((height, width), dtype=np.uint8)
            expected[y:y + h, x:x + w] = 1
            assert (mask.numpy() != expected).sum() <= 2 * (w + h), 'polygon mask on its box'
    # the crowd region stays in the index the COCO metric evaluates against, with its RLE
    crowd = [ann for ann in dataset.coco.dataset['annotations'] if ann['iscrowd']]
    assert len(crowd) == 1 and dataset.coco.annToMask(crowd[0]).sum() == 40 * 20


def test_the_real_config_trains_two_iterations_and_evaluates_every_val_image(coco_root, tiny_config, tmp_path,
                                                                             caplog):
    cfg = tiny_config(**{'train_cfg.max_iters': 2, 'train_cfg.val_interval': 2, 'checkpoint_cfg.save_last': False})
    cfg.tasks = {'det': coco_task(coco_root)}
    trainer = Trainer(cfg, tmp_path / 'run')
    results = trainer.train()
    assert trainer.step == 2
    assert set(results['det']) == {'mAP', 'mAP_50', 'mAP_75', 'mAP_s', 'mAP_m', 'mAP_l'}
    assert all(math.isnan(value) or 0 <= value <= 100 for value in results['det'].values())
    assert 'had no predictions passed to the metric' not in caplog.text, 'every val image reached the metric'


def test_check_data_is_clean_then_names_each_injected_fault(coco_root, tmp_path, capsys, load_tool):
    config = tmp_path / 'coco_config.py'
    config.write_text(f'tasks = {dict(det=coco_task(coco_root))!r}\n')
    tool = load_tool('check_data')
    assert tool.main([str(config)]) == 0
    assert capsys.readouterr().out.strip() == 'no problems found'

    missing = coco_root / 'val2017' / '000000000285.jpg'  # an image whose annotations remain
    missing.unlink()
    train_json = coco_root / 'annotations' / 'instances_train2017.json'
    content = json.loads(train_json.read_text())
    content['annotations'][0]['bbox'] = [100.0, 6.0, 20.0, 14.0]  # image 9 is 64 pixels wide
    train_json.write_text(json.dumps(content))
    assert tool.main([str(config)]) == 1
    printed = capsys.readouterr().out
    assert str(missing) in printed and 'missing file' in printed
    assert str(train_json) in printed and 'lies entirely outside its 48x64 image' in printed
    assert printed.rstrip().endswith('1 error and 1 warning in 2 datasets')
