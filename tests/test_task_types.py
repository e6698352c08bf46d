"""Task types are an open extension point: a type registered from outside mtvision (here, in this file) trains,
evaluates and draws beside the built-in ones, and every framework decision is the spec's."""
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from mtvision.data.collate import COLLATE_FNS, collate_depth
from mtvision.engine import Trainer
from mtvision.engine.evaluator import evaluate, inference_cfg
from mtvision.registry import DATASETS, METRICS, MODELS, TASK_TYPES
from mtvision.task_types import TaskType, registered_task_types, task_type_spec
from mtvision.tasks import Task, build_tasks
from mtvision.visualization import DPI, PANEL_INCHES, save_prediction_grid

TOY_TYPE = 'scalar regression'
IMAGE_SIZE = 64


class BrightnessImages(torch.utils.data.Dataset):
    """Random normalised images, each with its mean brightness (0..1) as the target."""

    def __init__(self, num_samples: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        # images of one flat grey level plus noise: the brightness is learnable from the mean token
        levels = torch.rand(num_samples, 1, 1, 1, generator=generator)
        noise = 0.1 * torch.randn(num_samples, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        pixels = (levels + noise).clamp(0, 1)
        self.images = (pixels - 0.5) / 0.5
        self.brightness = pixels.mean(dim=(1, 2, 3))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], float(self.brightness[index])


class BrightnessHead(nn.Module):
    def __init__(self, embed_dim: int, in_channels=(), in_strides=()):
        super().__init__()
        self.fc = nn.Linear(embed_dim, 1)

    def forward(self, features) -> Tensor:
        return self.fc(features.pooled)[:, 0]

    def loss(self, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        return dict(loss_brightness=F.mse_loss(outputs.float(), targets))

    @torch.no_grad()
    def predict(self, outputs: Tensor) -> Tensor:
        return outputs.float()


class MeanAbsoluteError:
    primary_key = 'abs_error'
    higher_is_better = False

    def __init__(self, dataset=None):
        self.reset()

    def reset(self) -> None:
        self._total, self._count = 0.0, 0

    def state(self) -> dict:
        return dict(total=self._total, count=self._count)

    def merge(self, states: list[dict]) -> None:
        self._total, self._count = sum(s['total'] for s in states), sum(s['count'] for s in states)

    def update(self, predictions: Tensor, targets: Tensor) -> None:
        self._total += float((predictions - targets).abs().sum())
        self._count += len(targets)

    def compute(self) -> dict[str, float]:
        return dict(abs_error=self._total / self._count if self._count else float('nan'))


def collate_brightness(samples) -> dict[str, Tensor]:
    return dict(images=torch.stack([image for image, _ in samples]),
                targets=torch.tensor([target for _, target in samples], dtype=torch.float32))


class ScalarRegressionTaskType(TaskType):
    display_name = 'Scalar Regression'
    collate = staticmethod(collate_brightness)
    grid_panels = 1

    @staticmethod
    def predictions_differ(before: Tensor, after: Tensor) -> Tensor:
        return (before - after).abs() > 0.01

    def draw_prediction_row(self, figure, axes, picture, target, prediction, names) -> None:
        axes[0].imshow(picture)
        axes[0].set_title(f'true {float(target):.2f}\npred {float(prediction):.2f}', fontsize=9)


TOY_PARTS = ((TASK_TYPES, ScalarRegressionTaskType, TOY_TYPE), (MODELS, BrightnessHead, None),
             (DATASETS, BrightnessImages, None), (METRICS, MeanAbsoluteError, None))


@pytest.fixture
def toy_task_type():
    """The toy type, its head, dataset and metric registered for the test, and removed after it."""
    for registry, module, name in TOY_PARTS:
        registry.import_from_location()  # the built-in parts first, so they are not imported over the toy ones
        registry.register_module(name=name, module=module)
    yield
    for registry, module, name in TOY_PARTS:
        registry._module_dict.pop(name or module.__name__)


def toy_task(**overrides) -> dict:
    return dict(type=TOY_TYPE, head=dict(type='BrightnessHead'),
                train_dataset=dict(type='BrightnessImages', num_samples=8),
                val_dataset=dict(type='BrightnessImages', num_samples=6, seed=1),
                metric=dict(type='MeanAbsoluteError'), batch_size=2, val_batch_size=4, **overrides)


def test_a_task_type_registered_outside_mtvision_trains_evaluates_and_draws(toy_task_type, tiny_config, tmp_path):
    cfg = tiny_config(**{'train_cfg.max_iters': 2, 'train_cfg.val_interval': 2, 'log_cfg.visualize': True})
    cfg.tasks = dict(cls=cfg.tasks['cls'], brightness=toy_task())
    cfg.train_cfg.val_at_start = False
    trainer = Trainer(cfg, tmp_path)
    before = {name: param.clone() for name, param in trainer.model.heads['brightness'].named_parameters()}
    trainer.train()
    assert all(not torch.equal(param, before[name])
               for name, param in trainer.model.heads['brightness'].named_parameters())

    results = evaluate(trainer.model, trainer.tasks)
    assert set(results) == {'cls', 'brightness'} and 0 <= results['brightness']['abs_error'] < 2
    # the metric against a reference computed here: the mean |prediction - brightness| over the val set
    dataset = trainer.tasks['brightness'].val_dataset
    with torch.no_grad():
        predicted = trainer.model.eval().predict('brightness', dataset.images)
    assert results['brightness']['abs_error'] == pytest.approx(float((predicted - dataset.brightness).abs().mean()),
                                                               rel=1e-5)
    # the trainer's evaluation drew the toy type's grid: one panel per sample, the val batch's 4 rows
    with Image.open(tmp_path / 'pictures' / 'brightness_iter_2.png') as picture:
        assert picture.size == (round(PANEL_INCHES * DPI), round(4 * PANEL_INCHES * DPI))


def test_the_framework_asks_the_spec_of_a_registered_type(toy_task_type, tmp_path):
    (task,) = build_tasks(dict(brightness=toy_task())).values()
    assert COLLATE_FNS[TOY_TYPE] is collate_brightness and TOY_TYPE in registered_task_types()
    with pytest.raises(ValueError, match=r"test_cfg.mode='slide' is for the dense task types \('segmentation', "
                                         r"'depth', 'normals'\), not 'scalar regression'"):
        inference_cfg(Task(**{**vars(task), 'test_cfg': dict(mode='slide', crop_size=32, stride=16)}))
    batch = collate_brightness([task.val_dataset[i] for i in range(3)])
    path = save_prediction_grid(tmp_path / 'grid.png', TOY_TYPE, batch['images'], batch['targets'],
                                batch['targets'] + 0.5, (0.5,) * 3, (0.5,) * 3)
    with Image.open(path) as picture:
        assert picture.size == (round(PANEL_INCHES * DPI), round(3 * PANEL_INCHES * DPI))


def test_an_unknown_type_lists_the_registered_ones(tiny_config):
    tasks = tiny_config().to_dict()['tasks']
    tasks['cls']['type'] = 'keypoints'
    with pytest.raises(ValueError, match=r"tasks.cls.type='keypoints' is not a registered task type; registered: "
                                         r"\('classification', 'detection', 'segmentation', 'depth', 'mae', "
                                         r"'contrastive'"):
        build_tasks(tasks)
    with pytest.raises(KeyError, match="'keypoints' is not a registered task type"):
        COLLATE_FNS['keypoints']


def test_the_toy_registrations_are_gone_after_the_test():
    # runs after the tests that register the toy parts (file order): nothing of them is left behind
    assert TOY_TYPE not in registered_task_types()
    assert 'BrightnessHead' not in MODELS.module_dict and 'MeanAbsoluteError' not in METRICS.module_dict


def test_dense_types_score_at_the_original_size():
    spec = task_type_spec('depth')
    assert spec.dense and spec.whole_image and spec.collate is collate_depth
    log_depth = torch.linspace(0, 1, 12).reshape(1, 3, 4)

    class Exp(nn.Module):
        predict = staticmethod(torch.exp)

    # the output is resized before predict (log space), as mmseg resizes logits: bilinear, align_corners=False
    expected = torch.exp(F.interpolate(log_depth[None], size=(6, 8), mode='bilinear', align_corners=False))
    torch.testing.assert_close(spec.predict_at_size(Exp(), log_depth, (6, 8)), expected)
    (per_image,) = spec.per_image_predictions(Exp(), log_depth[None], [(6, 8)], (3, 4), None)
    torch.testing.assert_close(per_image, expected[0, 0])
