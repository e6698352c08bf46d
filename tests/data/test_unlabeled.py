import cv2
import numpy as np
import pytest
import torch

from mtvision.data import DataError, ImageFolderDataset, ImagesOf, UnlabeledImageFolder
from mtvision.data.collate import COLLATE_FNS
from mtvision.data.transforms import MultiView

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


def test_multiview_pipeline_gives_independent_views_collated_view_major(tmp_path):
    for i in range(3):
        write(tmp_path / f'{i}.png', 40 * (i + 1))
    crop = [dict(type='RandomResizedCrop', size=4, scale=(0.1, 0.5)), dict(type='ToFloat')]
    dataset = UnlabeledImageFolder(tmp_path, [dict(type='MultiView', num_views=2, pipeline=crop)])
    torch.manual_seed(0)
    samples = [dataset[i] for i in range(3)]
    assert all(len(views) == 2 and target is None for views, target in samples)
    batch = COLLATE_FNS['contrastive'](samples)
    assert batch['targets'] is None and batch['images'].shape == (6, 3, 4, 4)
    for i, (views, _) in enumerate(samples):
        assert torch.equal(batch['images'][i], views[0]) and torch.equal(batch['images'][3 + i], views[1])
        # plain-colour images: each view keeps its image's colour, whatever the crop
        assert torch.allclose(views[1], torch.full((3, 4, 4), 40 * (i + 1) / 255))


def test_images_of_applies_its_own_pipeline_to_the_image_alone(tmp_path):
    write(tmp_path / 'x' / '0.png', 100)
    images = ImagesOf(dict(type='ImageFolderDataset', data_root=str(tmp_path)),
                      pipeline=[dict(type='MultiView', pipeline=[dict(type='ToFloat')])])
    views, target = images[0]
    assert target is None and len(views) == 2 and torch.allclose(views[0], torch.full((3, 8, 8), 100 / 255))


def test_contrastive_collate_explains_a_missing_multiview():
    with pytest.raises(TypeError, match='MultiView'):
        COLLATE_FNS['contrastive']([(torch.zeros(3, 4, 4), None)])
    with pytest.raises(ValueError, match='MultiView needs num_views >= 2'):
        MultiView([], num_views=1)
