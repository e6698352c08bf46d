import cv2
import numpy as np
import pytest
import torch

from mtvision.data import DataError, ImageFolderDataset, ImagesOf, UnlabeledImageFolder
from mtvision.data.collate import COLLATE_FNS

PIPELINE = [dict(type='ToFloat')]


def write(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((8, 8, 3), value, np.uint8))


def test_unlabeled_folder_reads_every_image_recursively(tmp_path):
    for i, name in enumerate(['b/2.png', 'a/1.png', 'c.png', 'a/deeper/3.png']):
        write(tmp_path / name, 10 * (i + 1))
    (tmp_path / 'notes.txt').write_text('not an image')
    dataset = UnlabeledImageFolder(tmp_path, PIPELINE)
    assert [p.relative_to(tmp_path).as_posix() for p in dataset.samples] == ['a/1.png', 'a/deeper/3.png',
                                                                             'b/2.png', 'c.png']
    image, target = dataset[0]
    assert target is None and torch.allclose(image, torch.full((3, 8, 8), 20 / 255))


def test_images_of_a_labeled_dataset_drop_the_labels(tmp_path):
    for i, cls in enumerate(['x', 'y']):
        write(tmp_path / cls / f'{i}.png', 100 + i)
    labeled = ImageFolderDataset(tmp_path, PIPELINE)
    images = ImagesOf(dict(type='ImageFolderDataset', data_root=str(tmp_path), pipeline=PIPELINE))
    assert len(images) == len(labeled) == 2
    for i in range(2):
        assert images[i][1] is None and torch.equal(images[i][0], labeled[i][0])
    batch = COLLATE_FNS['mae']([images[0], images[1]])
    assert batch['targets'] is batch['images'] and batch['images'].shape == (2, 3, 8, 8)


def test_empty_folder_is_an_error_naming_it(tmp_path):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DataError, match='empty.*no image'):
        UnlabeledImageFolder(tmp_path / 'empty')
