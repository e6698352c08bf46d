"""The data audit finds every injected fault with its file and index, and nothing on clean data; SkipBadSamples."""
import json
import logging
import pickle
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from mtvision.config import load_config
from mtvision.data import CocoDetectionDataset, DataError, ImageFolderDataset
from mtvision.data.audit import Finding, audit_dataset, audit_task, audit_tasks, format_findings
from mtvision.data.datasets.skipping import SkipBadSamples

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / 'configs' / 'quickstart' / 'vit-tiny-p8_4task_synthetic.py'
CLASSES = ('circle', 'square', 'triangle', 'star', 'hexagon', 'cross')  # the quick start's class order
_TASKS = []


def quickstart_tasks(data_root: Path) -> dict:
    """The quick start's tasks, their data paths moved from data/synthetic to ``data_root``."""
    if not _TASKS:
        _TASKS.append(load_config(str(QUICKSTART)).to_dict()['tasks'])

    def repoint(value):
        if isinstance(value, dict):
            return {key: repoint(item) for key, item in value.items()}
        if isinstance(value, list):
            return [repoint(item) for item in value]
        if isinstance(value, str) and value.startswith('data/synthetic'):
            return str(data_root) + value[len('data/synthetic'):]
        return value
    return repoint(_TASKS[0])


@pytest.fixture
def data(tiny_data, tmp_path) -> Path:
    """A private copy of the session's tiny synthetic dataset (8 train and 6 val scenes per task), to break."""
    return Path(shutil.copytree(tiny_data, tmp_path / 'data'))


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def edit_json(path: Path, edit) -> None:
    content = load_json(path)
    edit(content)
    path.write_text(json.dumps(content))


def truncate(path: Path) -> None:
    content = path.read_bytes()
    path.write_bytes(content[:len(content) // 2])


def classification_index(root: Path, path: Path) -> int:
    """Sample index of a class-folder image: classes in config order, file names sorted within each."""
    order = [file for name in CLASSES for file in sorted((root / name).iterdir())]
    return order.index(path)


def stem_index(folder: Path, stem: str) -> int:
    return sorted(file.stem for file in folder.iterdir()).index(stem)


def coco_paths(data: Path, split: str = 'train') -> tuple[Path, Path]:
    return data / 'detection' / 'images' / split, data / 'detection' / 'annotations' / f'instances_{split}.json'


def only(findings: list[Finding]) -> Finding:
    assert len(findings) == 1, format_findings(findings)
    return findings[0]


# the audit --------------------------------------------------------------------------------------------------------

def test_clean_data_has_no_findings(tiny_data):
    assert audit_tasks(quickstart_tasks(tiny_data)) == []
    assert format_findings([]) == 'no problems found'


def fault_truncated_image(data):
    path = data / 'classification' / 'train' / 'square' / '000001.jpg'
    truncate(path)
    return 'cls', path, classification_index(path.parents[1], path), 'corrupt|truncated', 'error'


def fault_coco_missing_file(data):
    img_dir, ann_file = coco_paths(data)
    (img_dir / '000002.jpg').unlink()
    names = [image['file_name'] for image in load_json(ann_file)['images']]
    return 'det', ann_file, names.index('000002.jpg'), "names a missing file .*000002.jpg", 'error'


def fault_zero_width_box(data):
    _, ann_file = coco_paths(data)
    edit_json(ann_file, lambda coco: coco['annotations'][3]['bbox'].__setitem__(2, 0))
    return 'det', ann_file, 3, r'annotation 3 .*non-positive size', 'error'


def fault_unknown_category(data):
    _, ann_file = coco_paths(data)
    edit_json(ann_file, lambda coco: coco['annotations'][1].__setitem__('category_id', 99))
    return 'det', ann_file, 1, r'category_id 99 is not in categories \[1, 2, 3, 4, 5, 6\]', 'error'


def fault_coco_size(data):
    img_dir, ann_file = coco_paths(data)
    edit_json(ann_file, lambda coco: coco['images'][2].__setitem__('width', 70))
    images = load_json(ann_file)['images']
    rank = sorted(image['id'] for image in images).index(images[2]['id'])
    return 'det', img_dir / images[2]['file_name'], rank, r'image is 64x64 but .* says 64x70', 'error'


def fault_box_outside(data):
    _, ann_file = coco_paths(data)
    edit_json(ann_file, lambda coco: coco['annotations'][0].__setitem__('bbox', [60, 10, 8, 5]))
    return 'det', ann_file, 0, 'more than a pixel outside its 64x64 image: clipped to it in training', 'warning'


def fault_box_entirely_outside(data):
    _, ann_file = coco_paths(data)
    edit_json(ann_file, lambda coco: coco['annotations'][0].__setitem__('bbox', [10, 64, 8, 5]))
    return 'det', ann_file, 0, r'box \[10, 64, 8, 5\] lies entirely outside its 64x64 image: dropped in training', \
        'warning'


def fault_label_map_out_of_range(data):
    path = data / 'segmentation' / 'annotations' / 'train' / '000004.png'
    labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    labels[:2, :3] = 9  # 7 classes (background + 6 shapes); 255 stays the ignore index
    cv2.imwrite(str(path), labels)
    return 'seg', path, stem_index(path.parent, '000004'), r'label ids \[9\] are out of range', 'error'


def fault_label_map_size(data):
    path = data / 'segmentation' / 'annotations' / 'train' / '000002.png'
    cv2.imwrite(str(path), np.zeros((32, 64), dtype=np.uint8))
    return 'seg', path, stem_index(path.parent, '000002'), 'map is 32x64 but its image is 64x64', 'error'


def fault_label_map_missing(data):
    label_dir = data / 'segmentation' / 'annotations' / 'train'
    (label_dir / '000006.png').unlink()
    return 'seg', label_dir, stem_index(data / 'segmentation' / 'images' / 'train', '000006'), 'has no label map', \
        'error'


def fault_depth_size(data):
    path = data / 'depth' / 'train' / 'depth' / '000005.png'
    cv2.imwrite(str(path), np.full((64, 48), 1000, dtype=np.uint16))
    return 'depth', path, stem_index(path.parent, '000005'), 'map is 64x48 but its image is 64x64', 'error'


def fault_depth_dtype(data):
    path = data / 'depth' / 'train' / 'depth' / '000000.png'
    cv2.imwrite(str(path), np.full((64, 64), 3, dtype=np.uint8))
    return 'depth', path, stem_index(path.parent, '000000'), 'stored as uint8, expected uint16', 'error'


FAULTS = [fault_truncated_image, fault_coco_missing_file, fault_zero_width_box, fault_unknown_category,
          fault_coco_size, fault_box_outside, fault_box_entirely_outside, fault_label_map_out_of_range,
          fault_label_map_size, fault_label_map_missing, fault_depth_size, fault_depth_dtype]


@pytest.mark.parametrize('inject', FAULTS, ids=[fault.__name__[6:] for fault in FAULTS])
def test_each_fault_is_found_with_its_path_and_index(data, inject):
    task, path, index, message, level = inject(data)
    finding = only(audit_tasks(quickstart_tasks(data)))  # every task and split: nothing else may be reported
    assert (finding.task, finding.split, finding.path, finding.index, finding.level) == \
        (task, 'train', str(path), index, level)
    assert re.search(message, finding.message), finding.message


def test_class_index_out_of_range_in_a_list_file(data):
    root = data / 'classification' / 'train'
    files = [file for name in CLASSES for file in sorted((root / name).iterdir())]
    lines = [f'{file.relative_to(root)} {CLASSES.index(file.parent.name)}' for file in files]
    lines[5] = lines[5].rsplit(maxsplit=1)[0] + ' 6'  # == num_classes
    ann_file = data / 'classification' / 'train.txt'
    ann_file.write_text('\n'.join(lines) + '\n')
    task = quickstart_tasks(data)['cls']
    task['train_dataset']['ann_file'] = str(ann_file)
    finding = only(audit_task('cls', task))
    assert (finding.path, finding.index) == (str(ann_file), 5)
    assert finding.message == 'line 6: class index 6 >= num_classes (6)'
    # without class names the labels decide the class count: the head no longer matches
    del task['train_dataset']['classes']
    finding = only(audit_task('cls', task, splits=['train']))
    assert finding.message == 'tasks.cls.head.num_classes=6 but the train dataset has 7 classes'


def test_every_fault_of_one_annotation_file_is_reported(data):
    img_dir, ann_file = coco_paths(data)
    coco = load_json(ann_file)
    assert len(coco['annotations']) > 6 and len(coco['images']) == 8
    coco['annotations'][0]['bbox'][2] = 0
    coco['annotations'][2]['category_id'] = 0
    coco['annotations'][4]['bbox'] = [1, 2, 3]
    coco['annotations'][5]['image_id'] = 1000
    coco['annotations'][6].update(category_id=42, bbox=[1, 1, 5, -1])  # two faults in one annotation
    ann_file.write_text(json.dumps(coco))
    (img_dir / coco['images'][1]['file_name']).unlink()
    truncate(img_dir / coco['images'][6]['file_name'])  # read after the missing image was left out
    cfg = dict(type='CocoDetectionDataset', img_dir=str(img_dir), ann_file=str(ann_file))
    found = [(finding.path, finding.index, finding.message) for finding in audit_dataset(cfg)]
    missing, truncated = (img_dir / coco['images'][i]['file_name'] for i in (1, 6))
    categories = '[1, 2, 3, 4, 5, 6]'
    assert found == [
        (str(ann_file), 1, f'image entry 1 (id {coco["images"][1]["id"]}) names a missing file {str(missing)!r}'),
        (str(ann_file), 0, f'annotation 0 (id 1): box with non-positive size, bbox {coco["annotations"][0]["bbox"]}'),
        (str(ann_file), 2, f'annotation 2 (id 3): category_id 0 is not in categories {categories}'),
        (str(ann_file), 4, 'annotation 4 (id 5): bbox must be [x, y, w, h] of finite numbers, got [1, 2, 3]'),
        (str(ann_file), 5, 'annotation 5 (id 6): image_id 1000 is not in images'),
        (str(ann_file), 6, f'annotation 6 (id 7): category_id 42 is not in categories {categories}'),
        (str(ann_file), 6, 'annotation 6 (id 7): box with non-positive size, bbox [1, 1, 5, -1]'),
        # its index among all images, although the missing image before it was left out
        (str(truncated), sorted(image['id'] for image in coco['images']).index(coco['images'][6]['id']),
         'corrupt or unsupported image file'),
    ]
    # the left-out annotations are gone from the targets, the others stay
    dataset = CocoDetectionDataset(img_dir, ann_file, errors='collect')
    image_id = coco['images'][3]['id']
    expected = [ann['category_id'] for index, ann in enumerate(coco['annotations'])
                if ann['image_id'] == image_id and index not in (0, 2, 4, 5, 6)]
    sample = dataset[dataset.img_ids.index(image_id)][1]
    assert [dataset.cat_ids[label] for label in sample['labels'].tolist()] == expected
    # one implementation of the checks: raise mode stops at the first error that collect mode lists
    with pytest.raises(DataError) as raised:
        CocoDetectionDataset(img_dir, ann_file)
    assert str(raised.value) == str(dataset.problems[0])


def test_every_bad_line_of_a_list_file_is_reported(data):
    root = data / 'classification' / 'train'
    files = [file for name in CLASSES for file in sorted((root / name).iterdir())]
    lines = [f'{file.relative_to(root)} {CLASSES.index(file.parent.name)}' for file in files]
    lines[1] = 'nolabel.jpg'
    lines[2] = 'circle/gone.jpg 7'  # a missing file and a class index out of range
    truncate(files[4])  # read after two lines were left out: still named by its line's index
    ann_file = data / 'classification' / 'train.txt'
    ann_file.write_text('\n'.join(lines[:3]) + '\n\n' + '\n'.join(lines[3:]) + '\n')  # a blank line counts for nothing
    findings = audit_dataset(dict(type='ImageFolderDataset', data_root=str(root), ann_file=str(ann_file),
                                  classes=CLASSES))
    assert [(finding.path, finding.index) for finding in findings] == \
        [(str(ann_file), 1), (str(ann_file), 2), (str(ann_file), 2), (str(files[4]), 4)]
    assert findings[1].message == 'line 3: class index 7 >= num_classes (6)'
    assert findings[2].message.startswith('line 3 names a missing image file')
    with pytest.raises(DataError, match=re.escape(f"{str(ann_file)!r}, index 1: line 2 is not")):
        ImageFolderDataset(root, ann_file=ann_file, classes=CLASSES)
    with pytest.raises(ValueError, match="errors must be one of .*got 'ignore'"):
        ImageFolderDataset(root, errors='ignore')


def test_max_problems_and_worker_processes(data):
    label_dir = data / 'segmentation' / 'annotations' / 'train'
    for stem in ('000001', '000003', '000005'):
        cv2.imwrite(str(label_dir / f'{stem}.png'), np.full((64, 64), 8, dtype=np.uint8))
    cfg = quickstart_tasks(data)['seg']['train_dataset']
    in_process = audit_dataset(cfg)
    assert [finding.index for finding in in_process] == [1, 3, 5]
    assert audit_dataset(cfg, num_workers=2) == in_process
    capped = audit_dataset(cfg, max_problems=2)
    assert capped[:2] == in_process[:2]
    assert (capped[2].level, capped[2].message) == \
        ('warning', 'stopped after max_problems=2 findings; samples from index 4 on were not read')


def test_wrapped_datasets_are_audited_through_the_inner_one(data):
    label_dir = data / 'segmentation' / 'annotations' / 'train'
    (label_dir / '000003.png').unlink()
    cv2.imwrite(str(label_dir / '000005.png'), np.zeros((8, 8), dtype=np.uint8))
    cfg = dict(type='ImagesOf', dataset=quickstart_tasks(data)['seg']['train_dataset'],
               pipeline=[dict(type='MultiView', num_views=2, pipeline=[dict(type='ToFloat')])])
    assert [(finding.path, finding.index) for finding in audit_dataset(cfg)] == \
        [(str(label_dir), 3), (str(label_dir / '000005.png'), 5)]


def test_a_constructor_that_cannot_index_gives_one_finding(data):
    _, ann_file = coco_paths(data)
    ann_file.write_text('{"images": [')
    finding = only(audit_task('det', quickstart_tasks(data)['det'], splits=['train']))
    assert (finding.path, finding.index) == (str(ann_file), None)
    assert finding.message.startswith('annotation file is not valid JSON')


def test_format_groups_by_task_and_split():
    findings = [Finding('seg', 'train', 'a.png', 3, 'bad map'), Finding('det', 'val', 'x.json', 0, 'box', 'warning'),
                Finding('seg', 'train', 'b.png', 12, 'bad map')]
    lines = format_findings(findings).splitlines()
    assert lines[0].split() == ['task', 'split', 'level', 'index', 'path', 'problem']
    assert [line.split() for line in lines[2:5]] == [
        ['seg', 'train', 'error', '3', 'a.png', 'bad', 'map'], ['error', '12', 'b.png', 'bad', 'map'],
        ['det', 'val', 'warning', '0', 'x.json', 'box']]
    assert lines[5] == '2 errors and 1 warning in 2 datasets'




def test_tool_exit_status_and_report(data, tmp_path, capsys, restore_logging, load_tool):
    config = tmp_path / 'config.py'
    config.write_text(f'tasks = {quickstart_tasks(data)!r}\n')
    tool = load_tool('check_data')
    assert tool.main([str(config)]) == 0
    assert capsys.readouterr().out.strip() == 'no problems found'

    val_map = data / 'depth' / 'val' / 'depth' / '000001.png'
    cv2.imwrite(str(val_map), np.ones((64, 64), dtype=np.uint8))
    fault_box_outside(data)  # a warning alone does not fail the check, unless --strict
    assert tool.main([str(config), '--split', 'train']) == 0
    assert tool.main([str(config), '--split', 'train', '--strict']) == 1
    out = tmp_path / 'report.json'
    assert tool.main([str(config), '--out', str(out)]) == 1
    printed = capsys.readouterr().out
    assert str(val_map) in printed and printed.rstrip().endswith('1 error and 1 warning in 2 datasets')
    report = load_json(out)
    assert (report['errors'], report['warnings']) == (1, 1)
    assert report['findings'][1] == dict(task='depth', split='val', path=str(val_map), index=1, level='error',
                                         message='depth map is stored as uint8, expected uint16 '
                                                 '(metres * depth_scale=1000)')
    # --cfg-options reach the datasets: the val maps of another dtype are what this config declares
    options = ['--cfg-options', 'tasks.depth.val_dataset.depth_dtype=uint8']
    assert tool.main([str(config), '--split', 'val', *options]) == 1
    assert 'stored as uint16, expected uint8' in capsys.readouterr().out


def test_data_error_level_survives_pickling():
    error = pickle.loads(pickle.dumps(DataError('box outside', 'a.json', 4, level='warning')))
    assert (error.problem, error.path, error.index, error.level) == ('box outside', 'a.json', 4, 'warning')
    with pytest.raises(ValueError, match="level must be one of .*got 'fatal'"):
        DataError('x', level='fatal')


# SkipBadSamples ---------------------------------------------------------------------------------------------------

class Flaky(Dataset):
    """Sample ``i`` is ``i``, except that the indices in ``bad`` raise DataError (or ``error``)."""
    classes = ['a', 'b']

    def __init__(self, size: int, bad: set[int], error: type = DataError):
        self.size, self.bad, self.error = size, bad, error

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        if index in self.bad:
            raise self.error('bad sample', f'sample_{index}.jpg', index)
        return index


def next_good(index: int, size: int, bad: set[int]) -> tuple[int, int]:
    """The sample that replaces ``index`` and how many bad samples were tried first: a plain loop."""
    tries = 0
    while index in bad:
        index, tries = (index + 1) % size, tries + 1
    return index, tries


def test_skip_bad_samples_returns_the_next_readable_one(caplog):
    size, bad = 7, {1, 2, 6}
    dataset = SkipBadSamples(Flaky(size, bad))
    reference = [next_good(index, size, bad) for index in range(size)]
    with caplog.at_level(logging.WARNING):
        assert [dataset[index] for index in range(size)] == [sample for sample, _ in reference] == \
            [0, 3, 3, 3, 4, 5, 0]
        assert [dataset[index] for index in range(size)] == [sample for sample, _ in reference]
    assert dataset.skipped == 2 * sum(tries for _, tries in reference)
    assert dataset.num_bad == 3 and dataset.bad_indices() == [1, 2, 6]
    logged = [record.getMessage() for record in caplog.records if 'skipping' in record.getMessage()]
    assert logged == [f"skipping unreadable sample {index}: 'sample_{index}.jpg', index {index}: bad sample"
                      for index in (1, 2, 6)], 'each bad sample is logged once'
    assert dataset.classes == ['a', 'b'] and len(dataset) == size


def test_skip_bad_samples_errors():
    with pytest.raises(DataError, match=r"index 1: every one of the 3 samples of Flaky is unreadable "
                                        r".*'sample_0.jpg', index 0: bad sample"):
        SkipBadSamples(Flaky(3, {0, 1, 2}))[1]
    with pytest.raises(KeyError):  # not bad data: a bug, which must not be skipped
        SkipBadSamples(Flaky(3, {1}, error=KeyError))[1]
    with pytest.raises(IndexError, match='index 3 is out of range'):
        SkipBadSamples(Flaky(3, set()))[3]


def test_skip_bad_samples_counts_across_worker_processes():
    size, bad = 12, {0, 4, 5, 11}
    dataset = SkipBadSamples(Flaky(size, bad))
    loader = DataLoader(dataset, batch_size=3, num_workers=2, multiprocessing_context='fork')
    batches = list(loader)
    reference = [next_good(index, size, bad) for index in range(size)]
    assert [len(batch) for batch in batches] == [3, 3, 3, 3]
    assert torch.cat(batches).tolist() == [sample for sample, _ in reference]
    assert dataset.skipped == sum(tries for _, tries in reference) == 6
    assert dataset.bad_indices() == sorted(bad)
