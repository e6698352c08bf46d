"""ImageNet-1k as downloaded: mmpretrain's flat val folder + val.txt, and Kaggle's LOC_val_solution.csv layout."""
import importlib.util
import re
from pathlib import Path

import pytest
import torch

from mtvision.data import DataError, ImageFolderDataset
from mtvision.data.audit import audit_dataset
from mtvision.engine import Trainer
from mtvision.tasks import build_tasks


def load_replica_helpers():
    """tests/imagenet_replica.py (the tests run under --import-mode=importlib: no sibling imports)."""
    spec = importlib.util.spec_from_file_location('imagenet_replica',
                                                  Path(__file__).resolve().parents[1] / 'imagenet_replica.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


replica = load_replica_helpers()
LAYOUTS, VAL_LABELS, WNIDS, val_name = replica.LAYOUTS, replica.VAL_LABELS, replica.WNIDS, replica.val_name
make_kaggle_layout, make_mmpretrain_layout = replica.make_kaggle_layout, replica.make_mmpretrain_layout

VAL_PIPELINE = [dict(type='ResizeCenterCrop', size=64, crop_pct=0.875), dict(type='ToFloat'),
                dict(type='Normalize', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))]


def val_dataset_cfg(layout: dict, **options) -> dict:
    """The val_dataset entry a config gives for the layout (what the README recommends)."""
    return dict(type='ImageFolderDataset', data_root=str(layout['val']), ann_file=str(layout['ann_file']),
                classes=str(layout['train']), pipeline=VAL_PIPELINE, **options)


def samples(dataset: ImageFolderDataset) -> list[tuple[str, int]]:
    return [(str(path), label) for path, label in dataset.samples]


def expected(pairs) -> list[tuple[str, int]]:
    return [(str(path), label) for path, label in pairs]


@pytest.mark.parametrize('layout_name', sorted(LAYOUTS))
def test_val_list_reads_every_image_with_its_label(tmp_path, layout_name):
    layout = LAYOUTS[layout_name](tmp_path)
    train = ImageFolderDataset(layout['train'])
    assert train.classes == list(WNIDS) and samples(train) == expected(layout['train_samples'])
    val = ImageFolderDataset(layout['val'], ann_file=layout['ann_file'], classes=layout['train'])
    assert val.classes == list(WNIDS) and not val.anonymous_classes
    assert samples(val) == expected(layout['val_samples'])
    assert sorted(label for _, label in val.samples) == sorted(VAL_LABELS)
    sample = val[0]
    image, label = sample
    assert image.shape == (3, 18, 24) and image.dtype == torch.uint8
    assert (sample.path, label) == samples(val)[0]


def test_kaggle_classes_come_from_the_synset_mapping_beside_the_solution_file(tmp_path):
    layout = make_kaggle_layout(tmp_path)
    val = ImageFolderDataset(layout['val'], ann_file=layout['ann_file'])
    assert val.classes == list(WNIDS)  # the wnid of each 'wnid description' line, not the description
    assert samples(val) == expected(layout['val_samples'])
    assert ImageFolderDataset(layout['val'], ann_file=layout['ann_file'], classes=layout['mapping']).classes == \
        list(WNIDS)
    layout['mapping'].unlink()
    with pytest.raises(DataError, match='needs the class order: give classes='):
        ImageFolderDataset(layout['val'], ann_file=layout['ann_file'])


def test_mmpretrain_indices_without_classes_are_anonymous(tmp_path):
    layout = make_mmpretrain_layout(tmp_path)
    val = ImageFolderDataset(layout['val'], ann_file=layout['ann_file'])
    assert val.anonymous_classes and val.classes == ['0', '1', '2']
    assert samples(val) == expected(layout['val_samples'])
    # a list of wnids rather than indices is read by name against the classes
    layout['ann_file'].write_text(''.join(f'{val_name(n)}.JPEG {WNIDS[label]}\n'
                                          for n, label in enumerate(VAL_LABELS, start=1)))
    assert samples(ImageFolderDataset(layout['val'], ann_file=layout['ann_file'], classes=list(WNIDS))) == \
        expected(layout['val_samples'])


@pytest.mark.parametrize('layout_name', sorted(LAYOUTS))
def test_trains_and_evaluates_on_the_layout(tiny_config, tmp_path, layout_name):
    layout = LAYOUTS[layout_name](tmp_path / 'imagenet')
    cfg = tiny_config(**{'train_cfg.max_iters': 2, 'train_cfg.val_interval': 1000})
    cls = cfg.tasks['cls'].to_dict()  # replaced, not merged: the synthetic data's classes must not survive
    cls.update(head=dict(cls['head'], num_classes=len(WNIDS)), metric=dict(type='Accuracy', topk=(1,)),
               train_dataset=dict(type='ImageFolderDataset', data_root=str(layout['train']),
                                  pipeline=cls['train_dataset']['pipeline']),
               val_dataset=val_dataset_cfg(layout))
    cfg.tasks = {'cls': cls}
    trainer = Trainer(cfg, tmp_path / 'work')
    assert len(trainer.tasks['cls'].val_dataset) == len(VAL_LABELS)
    results = trainer.train()
    assert trainer.step == 2
    top1 = results['cls']['top1']
    # 6 images: the accuracy is a whole number of them
    assert 0 <= top1 <= 100 and round(top1 * len(VAL_LABELS) / 100, 6).is_integer()


def classification_task(layout: dict, **val_options) -> dict:
    return dict(type='classification', head=dict(type='ClassificationHead', num_classes=3),
                train_dataset=dict(type='ImageFolderDataset', data_root=str(layout['train']), pipeline=VAL_PIPELINE),
                val_dataset={**val_dataset_cfg(layout), **val_options}, batch_size=2)


def test_val_classes_in_another_order_stop_the_start_naming_the_first_difference(tmp_path):
    layout = make_kaggle_layout(tmp_path)
    # a synset mapping with the first two classes swapped, as from another release's class index
    lines = layout['mapping'].read_text().splitlines()
    layout['mapping'].write_text('\n'.join([lines[1], lines[0], lines[2]]) + '\n')
    task = classification_task(layout, classes=str(layout['mapping']))
    with pytest.raises(DataError, match=re.escape(
            f"tasks.imagenet: class 0 is '{WNIDS[0]}' in the train set but '{WNIDS[1]}' in the val set")):
        build_tasks(dict(imagenet=task))
    task['val_dataset']['classes'] = list(WNIDS[:2])  # a class short, with every wnid of the list still known
    layout['ann_file'].write_text('ImageId,PredictionString\n' + f'{val_name(2)},{WNIDS[0]} 1 1 5 5\n')
    with pytest.raises(DataError, match='the train set has 3 classes but the val set 2'):
        build_tasks(dict(imagenet=task))
    assert build_tasks(dict(imagenet=classification_task(layout)))['imagenet'].val_dataset.classes == list(WNIDS)


CSV_HEADER = 'ImageId,PredictionString'
BAD_LINES = [
    # (layout, line written as line 3 of the list, the message)
    ('mmpretrain', f'{val_name(3)}.JPEG', r"line 3 is not \"<relpath> <label>\": 'ILSVRC2012_val_00000003.JPEG'"),
    ('mmpretrain', f'{val_name(3)}.JPEG n09999999', "line 3: label 'n09999999' is neither a class index nor one "
                                                    'of the 3 class names'),
    ('mmpretrain', f'{val_name(3)}.JPEG 3', r'line 3: class index 3 >= num_classes \(3\)'),
    ('mmpretrain', f'{val_name(3)}.JPEG -1', "line 3: label '-1' is neither"),
    ('mmpretrain', f'{val_name(9)}.JPEG 1', 'line 3 names a missing image file .*ILSVRC2012_val_00000009.JPEG'),
    ('kaggle', f'{val_name(3)},n09999999 1 1 5 5', "line 3: wnid 'n09999999' is not among the 3 classes"),
    ('kaggle', f'{val_name(3)} {WNIDS[0]} 1 1 5 5', 'line 3 is not "<ImageId>,<wnid> <box> ..."'),
    ('kaggle', f'{val_name(3)},', 'line 3 is not "<ImageId>,<wnid> <box> ..."'),
    ('kaggle', f'{val_name(9)},{WNIDS[0]} 1 1 5 5', 'line 3 names a missing image file .*ILSVRC2012_val_00000009'),
]


def write_list(layout: dict, third_line: str) -> None:
    """The layout's list with its third line replaced (the CSV header is line 1)."""
    lines = layout['ann_file'].read_text().splitlines()
    lines[2] = third_line
    layout['ann_file'].write_text('\n'.join(lines) + '\n')


@pytest.mark.parametrize('layout_name, line, message', BAD_LINES)
def test_a_bad_line_is_a_data_error_naming_the_list_and_line(tmp_path, layout_name, line, message):
    layout = LAYOUTS[layout_name](tmp_path)
    write_list(layout, line)
    entry = 2 if layout_name == 'mmpretrain' else 1  # the CSV header is no entry
    with pytest.raises(DataError, match=f"^{re.escape(repr(str(layout['ann_file'])))}, index {entry}: {message}"):
        ImageFolderDataset(layout['val'], ann_file=layout['ann_file'], classes=layout['train'])
    # collected, the line is left out, the others kept
    dataset = ImageFolderDataset(layout['val'], ann_file=layout['ann_file'], classes=layout['train'],
                                 errors='collect')
    assert [(error.path, error.index) for error in dataset.problems] == [(str(layout['ann_file']), entry)]
    assert len(dataset) == len(VAL_LABELS) - 1


def test_malformed_list_files(tmp_path):
    layout = make_kaggle_layout(tmp_path)
    text = layout['ann_file'].read_text()
    layout['ann_file'].write_text(text.replace(CSV_HEADER, 'id,label'))
    with pytest.raises(DataError, match="must start with the header line 'ImageId,PredictionString'.*'id,label'"):
        ImageFolderDataset(layout['val'], ann_file=layout['ann_file'])
    layout['ann_file'].write_text(CSV_HEADER + '\n')
    with pytest.raises(DataError, match='annotation file lists no images'):
        ImageFolderDataset(layout['val'], ann_file=layout['ann_file'])
    layout['mapping'].write_text(f'{WNIDS[0]} tench\n{WNIDS[1]} goldfish\n\n{WNIDS[0]} tench again\n')
    with pytest.raises(DataError, match=f"LOC_synset_mapping.txt': class '{WNIDS[0]}' is listed twice "
                                        r'\(lines 1 and 4\)'):
        ImageFolderDataset(layout['train'], classes=layout['mapping'])
    with pytest.raises(DataError, match='cannot read the class list'):
        ImageFolderDataset(layout['train'], classes=str(tmp_path / 'missing.txt'))
    # a plain class list names one class per line, spaces included
    names = tmp_path / 'classes.txt'
    names.write_text('tench\ngoldfish\ngreat white shark\n')
    indices = tmp_path / 'val.txt'
    indices.write_text(f'{val_name(1)}.JPEG 2\n')
    dataset = ImageFolderDataset(layout['val'], ann_file=indices, classes=names)
    assert dataset.classes == ['tench', 'goldfish', 'great white shark'] and dataset.samples[0][1] == 2




@pytest.mark.parametrize('layout_name', sorted(LAYOUTS))
def test_check_data_is_clean_on_the_replica_and_names_a_missing_val_file(tmp_path, capsys, load_tool,
                                                                         restore_logging, layout_name):
    layout = LAYOUTS[layout_name](tmp_path / 'imagenet')
    config = tmp_path / 'config.py'
    config.write_text(f'tasks = {dict(imagenet=classification_task(layout))!r}\n')
    tool = load_tool('check_data')
    assert tool.main([str(config)]) == 0
    assert capsys.readouterr().out.strip() == 'no problems found'

    missing = layout['val'] / f'{val_name(9)}.JPEG'
    write_list(layout, f'{missing.name} 1' if layout_name == 'mmpretrain' else
               f'{val_name(9)},{WNIDS[1]} 1 1 5 5')
    assert tool.main([str(config), '--split', 'val']) == 1
    printed = capsys.readouterr().out
    assert str(layout['ann_file']) in printed and f'line 3 names a missing image file {str(missing)!r}' in printed
    assert printed.rstrip().endswith('1 error and 0 warnings in 1 dataset')
    # the audit reads the other images and finds nothing more
    findings = audit_dataset(val_dataset_cfg(layout))
    assert [(finding.path, finding.index) for finding in findings] == \
        [(str(layout['ann_file']), 2 if layout_name == 'mmpretrain' else 1)]
