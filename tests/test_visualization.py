import cv2
import matplotlib
import numpy as np
import pytest
import torch

from mtvision.visualization import DPI, PANEL_INCHES, denormalize, save_loss_curves, save_prediction_grid

MEAN_01, STD_01 = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MEAN_255, STD_255 = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
PANEL = int(PANEL_INCHES * DPI)


def _solid_images(rgb, size, mean, std, batch=1):
    """Normalised images of one colour, normalised by hand on the scale the mean is given in."""
    scale = 255.0 if max(mean) > 1 else 1.0
    channels = [(value / 255.0 * scale - m) / s for value, m, s in zip(rgb, mean, std)]
    return torch.tensor(channels, dtype=torch.float32)[None, :, None, None].expand(batch, 3, *size).clone()


@pytest.mark.parametrize('mean, std', [(MEAN_01, STD_01), (MEAN_255, STD_255)])
def test_denormalize_inverts_the_normalisation_on_either_scale(mean, std):
    images = _solid_images((200, 40, 90), (2, 3), mean, std, batch=2)
    images[1, :, 0, 0] = 50.0  # far above white: clipped
    pictures = denormalize(images, mean, std)
    assert pictures.dtype == np.uint8 and pictures.shape == (2, 2, 3, 3)
    assert pictures[0].reshape(-1, 3).tolist() == [[200, 40, 90]] * 6
    assert pictures[1, 0, 0].tolist() == [255, 255, 255]


def test_saved_panel_shows_the_original_colour(tmp_path):
    images = _solid_images((200, 40, 90), (32, 32), MEAN_255, STD_255)
    path = save_prediction_grid(tmp_path / 'grid.png', 'classification', images, torch.tensor([1]),
                                torch.tensor([[0.2, 0.8]]), MEAN_255, STD_255, class_names=['cat', 'dog'])
    picture = cv2.imread(str(path))
    assert picture.shape == (PANEL, PANEL, 3)
    # the figure's centre lies inside the only image panel; cv2 reads BGR
    centre = picture[PANEL // 2 - 3:PANEL // 2 + 3, PANEL // 2 - 3:PANEL // 2 + 3].reshape(-1, 3)
    assert np.abs(centre.astype(int) - [90, 40, 200]).max() <= 1


def _batch(task_type, batch, size):
    generator = torch.Generator().manual_seed(0)
    h, w = size
    if task_type == 'classification':
        return torch.tensor([0, 2, 1]), torch.softmax(torch.randn(batch, 3, generator=generator), dim=1)
    if task_type == 'detection':
        targets = [dict(boxes=torch.tensor([[2.0, 3.0, 20.0, 15.0]]), labels=torch.tensor([1]), image_id=i,
                        orig_size=size, input_size=size) for i in range(batch)]
        predictions = [dict(boxes=torch.tensor([[2.0, 4.0, 21.0, 15.0], [5.0, 5.0, 9.0, 9.0]]),
                            scores=torch.tensor([0.9, 0.1]), labels=torch.tensor([1, 0])) for _ in range(batch)]
        return targets, predictions
    if task_type == 'segmentation':
        targets = torch.randint(0, 4, (batch, h, w), generator=generator)
        targets[:, :2] = 255
        return targets, torch.randint(0, 4, (batch, h, w), generator=generator)
    targets = torch.rand(batch, 1, h, w, generator=generator) * 5
    targets[:, :, :2] = 0
    return targets, targets + 0.1


@pytest.mark.parametrize('task_type, panels', [('classification', 1), ('detection', 2), ('segmentation', 3),
                                               ('depth', 3)])
def test_grid_has_a_row_per_sample_and_a_panel_per_view(tmp_path, task_type, panels):
    targets, predictions = _batch(task_type, 3, (24, 32))
    images = torch.randn(3, 3, 24, 32)
    (tmp_path / 'grid.png').write_bytes(b'stale')  # an existing file is replaced whole
    path = save_prediction_grid(tmp_path / 'grid.png', task_type, images, targets, predictions, MEAN_01, STD_01,
                                class_names=['a', 'b', 'c', 'd'], max_samples=2)
    picture = cv2.imread(str(path))
    assert picture is not None and picture.shape == (2 * PANEL, panels * PANEL, 3)
    assert [p.name for p in tmp_path.iterdir()] == ['grid.png']  # no temporary file left behind


def test_ignored_segmentation_pixels_are_black(tmp_path):
    images = _solid_images((255, 255, 255), (32, 32), MEAN_01, STD_01)
    targets = torch.full((1, 32, 32), 255)
    path = save_prediction_grid(tmp_path / 'seg.png', 'segmentation', images, targets, torch.zeros(1, 32, 32,
                                dtype=torch.long), MEAN_01, STD_01)
    picture = cv2.imread(str(path))
    # centres of the image, ground-truth and prediction panels
    image_centre, truth_centre, prediction_centre = (picture[PANEL // 2, PANEL * k + PANEL // 2] for k in range(3))
    assert image_centre.tolist() == [255, 255, 255]
    assert truth_centre.tolist() == [0, 0, 0]
    assert prediction_centre.max() > 100  # class 0 has a bright colour


def test_unknown_task_type_is_named(tmp_path):
    with pytest.raises(ValueError, match="'keypoints'"):
        save_prediction_grid(tmp_path / 'x.png', 'keypoints', torch.zeros(1, 3, 4, 4), None, None, MEAN_01, STD_01)


def test_loss_curves_with_records_missing_keys(tmp_path):
    records = [dict(step=10 * i, lr=1e-3 * min(1.0, i / 5), **{'loss/total': 3.0 / (i + 1)}) for i in range(40)]
    for i, record in enumerate(records):
        if i % 2:
            record['loss/det'] = 1.0 / (i + 1)
    records[3]['loss/total'] = float('nan')
    path = save_loss_curves(tmp_path / 'curves' / 'loss.png', records)
    picture = cv2.imread(str(path))
    assert picture is not None and picture.shape == (5 * DPI, 8 * DPI, 3)
    assert [p.name for p in path.parent.iterdir()] == ['loss.png']


def test_loss_curves_need_a_step(tmp_path):
    with pytest.raises(ValueError, match='scalar record 1 has no .step.'):
        save_loss_curves(tmp_path / 'loss.png', [{'step': 1, 'loss': 1.0}, {'loss': 0.5}])


def test_contrastive_grid_shows_the_view_each_embedding_retrieves(tmp_path):
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0)]  # view 1 of a, b; view 2 of a, b
    images = torch.cat([_solid_images(colour, (16, 16), MEAN_01, STD_01) for colour in colours])
    # a's embedding is nearest to b's second view, b's to its own
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    path = save_prediction_grid(tmp_path / 'views.png', 'contrastive', images, None, embeddings, MEAN_01, STD_01)
    picture = cv2.imread(str(path))
    assert picture.shape == (2 * PANEL, 3 * PANEL, 3)
    centre = PANEL // 2

    def bgr_at(row, col):
        return picture[row * PANEL + centre, col * PANEL + centre].astype(int)[::-1]

    assert np.abs(bgr_at(0, 1) - colours[2]).max() <= 1  # a's second view
    assert np.abs(bgr_at(0, 2) - colours[3]).max() <= 1  # retrieved: b's second view
    assert np.abs(bgr_at(1, 2) - colours[3]).max() <= 1  # b retrieves its own


def test_expert_usage_heatmap_marks_collapse_red_uniform_white_and_silent_tasks_grey(tmp_path):
    from mtvision.visualization import save_expert_usage

    # one layer, E = 2: 'collapsed' sends everything to expert 1, 'uniform' splits evenly, 'silent' sent nothing
    counts = torch.tensor([[0.0, 40.0], [20.0, 20.0], [0.0, 0.0]])
    path = save_expert_usage(tmp_path / 'usage.png', {'blocks.1.mlp': (['collapsed', 'uniform', 'silent'], counts)})
    picture = cv2.imread(str(path))[..., ::-1].astype(int)  # RGB

    def region(rgb):
        """Mean (y, x) and size of the pixels of one colour."""
        ys, xs = np.nonzero(np.all(np.abs(picture - np.array(rgb)) <= 3, axis=-1))
        return ys.mean(), xs.mean(), len(ys)
    cmap = matplotlib.colormaps['RdBu_r']
    red, blue, white = (region([round(255 * c) for c in cmap(value)[:3]]) for value in (1.0, 0.0, 0.5))
    grey = region([178, 178, 178])
    assert min(red[2], blue[2], white[2], grey[2]) > 300  # each a whole cell
    assert abs(red[0] - blue[0]) < 3 and red[1] > blue[1]  # 'collapsed': expert 1 red, expert 0 blue
    assert red[0] < white[0] < grey[0]  # then the uniform row (white), then the silent one (grey)
