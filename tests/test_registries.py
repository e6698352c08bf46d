"""Contract tests over the registries: every registered head, aggregator, dataset, metric and task type gets the
same checks
(as timm parametrises its tests over ``list_models()``), so a component is tested the day it is registered.

Parametrisation reads the registries themselves; the few things a registry cannot say (a head's task type and
smallest config, which config builds a dataset) are tables here, and a registered name missing from them fails.
"""
import math

import pytest
import torch
from torch import nn

from mtvision.data.collate import COLLATE_FNS
from mtvision.models.multitask import MultiTaskModel
from mtvision.registry import AGGREGATORS, DATASETS, METRICS, MODELS, TASK_TYPES
from mtvision.task_types import TaskType, task_type_spec
from mtvision.tasks import build_tasks

for _registry in (MODELS, DATASETS, METRICS, AGGREGATORS, TASK_TYPES):
    _registry.import_from_location()

MIXTURE = 'configs/mixture/full-mixture_vit-tiny-p8_600it_synthetic.py'  # every task type on the synthetic data
SHARED = 'configs/shared/seg-depth-normals-tags_vit-tiny-p8_600it_synthetic.py'  # and those of the shared images
DINO = 'configs/dino/dino_vit-tiny-p8_600it_synthetic.py'  # multi-crop batches
# a head has loss() and predict() (as the model that holds the heads has, by task)
HEADS = sorted(name for name, cls in MODELS.module_dict.items() if not issubclass(cls, MultiTaskModel)
               and callable(getattr(cls, 'loss', None)) and callable(getattr(cls, 'predict', None)))

VIT = dict(type='ViT', model_name='vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=2,
           num_heads=2)
SWIN = dict(type='Swin', model_name='swin_tiny_patch4_window7_224', img_size=32, window_size=4, embed_dim=16,
            depths=(1, 1), num_heads=(1, 2), out_indices=(0, 1), mask_patch_size=8)
# dense heads read the backbone's maps, which come before its final norm (the tokens' only user)
FINAL_NORM = {'backbone.model.norm.weight', 'backbone.model.norm.bias'}
# head: (task type, backbone, the head's smallest config, the trainable parameters its loss does not reach)
HEAD_CASES = {
    'ClassificationHead': ('classification', VIT, dict(num_classes=6), set()),
    'FCOSHead': ('detection', VIT, dict(num_classes=6), FINAL_NORM),
    'MaskRCNNHead': ('instance_segmentation', VIT, dict(num_classes=6), FINAL_NORM),
    'SemanticFPNHead': ('segmentation', VIT, dict(num_classes=7, channels=16), FINAL_NORM),
    'UPerHead': ('segmentation', VIT, dict(num_classes=7, channels=64), FINAL_NORM),
    'DepthHead': ('depth', VIT, dict(max_depth=10.0, channels=16), FINAL_NORM),
    'NormalsHead': ('normals', VIT, dict(channels=16), FINAL_NORM),
    'MultiLabelClassificationHead': ('multilabel', VIT, dict(num_classes=6), set()),
    'MAEHead': ('mae', VIT, dict(mask_ratio=0.75, decoder_dim=16, decoder_depth=1, decoder_heads=2), set()),
    'SimMIMHead': ('mae', SWIN, dict(mask_ratio=0.6), FINAL_NORM),
    'SimCLRHead': ('contrastive', VIT, dict(hidden_dim=16, out_dim=8), set()),
    'MoCoV3Head': ('contrastive', VIT, dict(hidden_dim=16, out_dim=8), set()),
    'DINOHead': ('dino', VIT, dict(hidden_dim=16, bottleneck_dim=8, out_dim=8, ibot=dict(mask_probability=1.0)), set()),
}
BATCH, SIZE, VIEWS = 2, 32, 2


def tiny_batch(task_type: str) -> dict:
    """Two 32x32 images and their targets in the collated format of ``task_type`` (docs/ARCHITECTURE.md)."""
    generator = torch.Generator().manual_seed(0)
    views = VIEWS if task_type in ('contrastive', 'dino') else 1
    images = torch.randn(BATCH * views, 3, SIZE, SIZE, generator=generator)
    if task_type == 'classification':
        targets = torch.tensor([1, 3])
    elif task_type in ('detection', 'instance_segmentation'):
        targets = [dict(boxes=torch.tensor([[2.0, 3.0, 20.0, 25.0]]), labels=torch.tensor([2]),
                        input_size=(SIZE, SIZE)),
                   dict(boxes=torch.tensor([[0.0, 0.0, 31.0, 31.0], [5.0, 6.0, 12.0, 14.0]]),
                        labels=torch.tensor([0, 4]), input_size=(SIZE, SIZE))]
        if task_type == 'instance_segmentation':  # each object's mask fills its box
            rows, cols = torch.arange(SIZE)[:, None], torch.arange(SIZE)
            for target in targets:
                target['masks'] = torch.stack([
                    ((cols >= x1) & (cols < x2) & (rows >= y1) & (rows < y2)).to(torch.uint8)
                    for x1, y1, x2, y2 in target['boxes'].tolist()])
    elif task_type == 'segmentation':
        targets = torch.randint(0, 7, (BATCH, SIZE, SIZE), generator=generator)
        targets[0, :4] = 255  # ignored
    elif task_type == 'depth':
        targets = torch.rand(BATCH, 1, SIZE, SIZE, generator=generator) * 5 + 0.5
        targets[1, :, :3] = 0  # invalid
    elif task_type == 'normals':
        targets = torch.nn.functional.normalize(torch.randn(BATCH, 3, SIZE, SIZE, generator=generator), dim=1)
        targets[1, :, :3] = 0  # invalid
    elif task_type == 'multilabel':
        targets = torch.tensor([[1.0, 0.0, 0.0, 1.0, -1.0, 0.0], [0.0, 1.0, -1.0, 0.0, 0.0, 0.0]])  # -1 unknown
    else:
        targets = images if task_type == 'mae' else None
    return dict(images=images, targets=targets)


def head_model(name: str) -> tuple[MultiTaskModel, str]:
    task_type, backbone, head, _ = HEAD_CASES[name]
    torch.manual_seed(0)
    return MultiTaskModel(backbone=backbone, heads={'task': dict(type=name, **head)}), task_type


def test_every_registered_head_has_a_case():
    assert set(HEADS) == set(HEAD_CASES), 'add the new head to HEAD_CASES (its task type and smallest config)'


@pytest.mark.parametrize('name', HEADS)
def test_head_loss_is_finite_and_reaches_every_trainable_parameter(name):
    model, task_type = head_model(name)
    batch = tiny_batch(task_type)
    terms = model.train().loss('task', batch, model.loss_normalizer('task', batch))
    assert terms and all(term.ndim == 0 and torch.isfinite(term) for term in terms.values()), terms
    sum(terms.values()).backward()
    unreached = {name for name, param in model.named_parameters() if param.requires_grad and (
        param.grad is None or not param.grad.abs().sum() > 0)}
    assert unreached == HEAD_CASES[name][3]
    assert all(torch.isfinite(param.grad).all() for param in model.parameters() if param.grad is not None)


@pytest.mark.parametrize('name', [name for name in HEADS if hasattr(MODELS.get(name), 'loss_normalizer')])
def test_head_loss_with_its_own_normalizer_is_its_plain_loss(name):
    """One process on the whole batch: the normaliser the trainer passes is the batch's own count."""
    model, task_type = head_model(name)
    batch = tiny_batch(task_type)
    outputs = model.train()('task', batch['images'])
    plain = model.heads['task'].loss(outputs, batch['targets'])
    normalised = model.heads['task'].loss(outputs, batch['targets'],
                                          normalizer=model.loss_normalizer('task', batch))
    assert plain.keys() == normalised.keys()
    for key in plain:
        torch.testing.assert_close(normalised[key], plain[key])


@pytest.mark.parametrize('name', HEADS)
def test_head_predictions_have_the_metric_format(name):
    model, task_type = head_model(name)
    images = tiny_batch(task_type)['images']
    with torch.no_grad():
        predictions = model.eval().predict('task', images)
    if task_type == 'classification':
        assert predictions.shape == (BATCH, 6)
        torch.testing.assert_close(predictions.sum(dim=1), torch.ones(BATCH))
    elif task_type in ('detection', 'instance_segmentation'):
        assert len(predictions) == BATCH
        for image in predictions:
            count = len(image['scores'])
            assert image['boxes'].shape == (count, 4) and image['labels'].shape == (count,)
            assert image['labels'].dtype == torch.int64 and ((image['labels'] >= 0) & (image['labels'] < 6)).all()
            if task_type == 'instance_segmentation':
                assert image['masks'].shape == (count, 1, SIZE, SIZE)
    elif task_type == 'segmentation':
        assert predictions.shape == (BATCH, SIZE, SIZE) and predictions.dtype == torch.int64
    elif task_type == 'depth':
        assert predictions.shape == (BATCH, 1, SIZE, SIZE) and (predictions > 0).all()
    elif task_type == 'normals':
        assert predictions.shape == (BATCH, 3, SIZE, SIZE)
        torch.testing.assert_close(predictions.norm(dim=1), torch.ones(BATCH, SIZE, SIZE))
    elif task_type == 'multilabel':
        assert predictions.shape == (BATCH, 6) and ((predictions >= 0) & (predictions <= 1)).all()
    elif task_type == 'mae':
        assert predictions['images'].shape == (BATCH, 3, SIZE, SIZE)
        assert predictions['mask'].shape == (BATCH, 1, SIZE, SIZE)
        assert set(predictions['mask'].unique().tolist()) == {0.0, 1.0}
    else:
        assert predictions.shape[0] == VIEWS * BATCH
        torch.testing.assert_close(predictions.norm(dim=1), torch.ones(VIEWS * BATCH))


class TwoTasks(nn.Module):
    """A shared linear layer and one linear head per task, with two toy losses that pull the shared layer apart."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(4, 6)
        self.heads = nn.ModuleDict({'a': nn.Linear(6, 1), 'b': nn.Linear(6, 1)})

    def losses(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
        z = self.shared(x)
        return z, {'a': (self.heads['a'](z) - 1).pow(2).mean(), 'b': (self.heads['b'](z) + 2).pow(2).mean()}


@pytest.mark.parametrize('name', sorted(AGGREGATORS.module_dict))
def test_aggregator_writes_every_gradient_of_two_toy_losses(name):
    model = TwoTasks()
    aggregator = AGGREGATORS.build(dict(type=name, loss_weights={'a': 1.0, 'b': 0.5}))
    learned = aggregator.attach(model.shared, torch.device('cpu'))  # the loss weights it learns, if any
    z, losses = model.losses()
    scalars = aggregator.backward(losses, list(model.shared.parameters()),
                                  {task: list(head.parameters()) for task, head in model.heads.items()},
                                  features={task: z for task in losses} if aggregator.needs_features else None)
    for param_name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, param_name
    assert all(param.grad is not None and torch.isfinite(param.grad).all() for param in learned)
    assert all(math.isfinite(float(value)) for value in scalars.values()), scalars  # numbers or 0-dim tensors
    aggregator.load_state_dict(aggregator.state_dict())  # what a resume does


def test_weighted_sum_is_the_gradient_of_the_weighted_loss():
    model = TwoTasks()
    _, losses = model.losses()
    expected = torch.autograd.grad(losses['a'] + 0.5 * losses['b'], list(model.parameters()), retain_graph=True)
    AGGREGATORS.build(dict(type='WeightedSum', loss_weights={'a': 1.0, 'b': 0.5})).backward(
        losses, list(model.shared.parameters()), {task: list(head.parameters()) for task, head in model.heads.items()})
    for param, grad in zip(model.parameters(), expected):
        torch.testing.assert_close(param.grad, grad)


@pytest.fixture
def mixture_tasks(tiny_config):
    """The config and tasks of the mixture config on the tiny synthetic data, with the shared-image config's tasks
    (prefixed ``shared_``), instance segmentation, a multi-label task on COCO instances, DINO and an ``ImagesOf``
    task added (a labeled dataset's images, for a self-supervised task): between them, every task type and
    dataset."""
    cfg = tiny_config(MIXTURE)
    tasks_cfg = cfg.to_dict()['tasks']
    tasks_cfg.update({f'shared_{name}': task for name, task in tiny_config(SHARED).to_dict()['tasks'].items()})
    coco = {split: {key: tasks_cfg['det'][f'{split}_dataset'][key] for key in ('img_dir', 'ann_file')}
            for split in ('train', 'val')}  # multi-label targets from the detection task's COCO instances
    tasks_cfg['inst'] = dict(tasks_cfg['det'], type='instance_segmentation',  # the detection data's instance masks
                             head=dict(type='MaskRCNNHead', num_classes=6),
                             metric=dict(type='COCOInstanceSegmentationMetric'))
    tasks_cfg['coco_tags'] = dict(tasks_cfg['shared_tags'], head=dict(tasks_cfg['shared_tags']['head'], num_classes=6),
                                  train_dataset=dict(type='CocoMultiLabelDataset', **coco['train'],
                                                     pipeline=tasks_cfg['cls']['val_dataset']['pipeline']),
                                  val_dataset=dict(type='CocoMultiLabelDataset', **coco['val'],
                                                   pipeline=tasks_cfg['cls']['val_dataset']['pipeline']))
    tasks_cfg['dino'] = tiny_config(DINO).to_dict()['tasks']['dino']  # two global and four local crops
    tasks_cfg['images_of'] = dict(tasks_cfg['mae'], train_dataset=dict(
        type='ImagesOf', dataset=tasks_cfg['cls']['train_dataset']), val_dataset=dict(
        type='ImagesOf', dataset=tasks_cfg['cls']['val_dataset']))
    return cfg, build_tasks(tasks_cfg)


@pytest.mark.parametrize('name', sorted(DATASETS.module_dict))
def test_dataset_builds_from_a_config_and_its_samples_collate(name, mixture_tasks):
    _, tasks = mixture_tasks
    uses = [task for task in tasks.values() if type(task.train_dataset).__name__ == name]
    assert uses, f'no task of {MIXTURE} or {SHARED} (or ImagesOf here) builds {name}: add one'
    assert DATASETS.get(name) is type(uses[0].train_dataset)
    for task in uses:
        dataset = task.train_dataset
        assert len(dataset) > 1
        samples = [dataset[0], dataset[1]]
        image, target = samples[0]
        views = image if task.type in ('contrastive', 'dino') else [image]
        assert all(view.dtype == torch.float32 and view.ndim == 3 and view.shape[0] == 3 for view in views)
        if task.type in ('mae', 'contrastive', 'dino'):
            assert target is None
        if task.type in ('segmentation', 'depth'):  # the stored ground truth, in the target's units
            assert hasattr(task.val_dataset, 'original_target')
            assert task.val_dataset.original_target(0).shape[-2:] == task.val_dataset[0][1].shape[-2:]
        batch = COLLATE_FNS[task.type](samples)
        global_views = {'contrastive': len(views), 'dino': 2}.get(task.type, 1)
        assert batch['images'].shape[0] == 2 * global_views
        assert batch.get('local_images') is None or batch['local_images'].shape[0] == 2 * (len(views) - 2)


@pytest.mark.parametrize('name', sorted(METRICS.module_dict))
def test_metric_scores_a_batch_and_merges_its_state(name, mixture_tasks):
    cfg, tasks = mixture_tasks
    uses = [task for task in tasks.values() if task.metric.get('type') == name]
    assert uses, f'no task of {MIXTURE} or {SHARED} is scored with {name}: add one'
    task = uses[0]
    cls = METRICS.get(name)
    assert isinstance(cls.primary_key, str) and isinstance(cls.higher_is_better, bool)
    torch.manual_seed(0)
    model = MultiTaskModel(backbone=cfg.model.backbone, heads={task.name: task.head}).eval()
    batch = COLLATE_FNS[task.type]([task.val_dataset[0], task.val_dataset[1]])
    with torch.no_grad():
        predictions = model.predict(task.name, batch['images'])
    metric = METRICS.build(task.metric, default_args=dict(dataset=task.val_dataset))
    metric.reset()
    metric.update(predictions, batch['targets'])
    scores = metric.compute()
    assert cls.primary_key in scores
    assert all(isinstance(value, float) for value in scores.values()), scores
    merged = METRICS.build(task.metric, default_args=dict(dataset=task.val_dataset))
    merged.reset()
    merged.merge([metric.state()])
    assert merged.compute() == pytest.approx(scores, nan_ok=True)


@pytest.mark.parametrize('name', sorted(TASK_TYPES.module_dict))
def test_task_type_collates_draws_and_maps_back_a_batch(name, mixture_tasks, tmp_path):
    from PIL import Image

    from mtvision.visualization import DPI, PANEL_INCHES, save_prediction_grid

    cfg, tasks = mixture_tasks
    uses = [task for task in tasks.values() if task.type == name]
    assert uses, f'no task of {MIXTURE} has the type {name!r}: add one'
    task, spec = uses[0], task_type_spec(name)
    assert isinstance(spec, TaskType) and isinstance(spec.display_name, str) and spec.display_name
    assert isinstance(spec.grid_panels, int) and spec.grid_panels >= 1
    assert spec.whole_image or not spec.dense  # a dense output covers the whole image
    samples = [task.val_dataset[0], task.val_dataset[1]]
    batch = spec.collate(samples)
    if spec.dense:  # scored at the stored ground truth's size
        assert task.val_dataset.original_target(0).shape[-2:] == samples[0][1].shape[-2:]
    torch.manual_seed(0)
    model = MultiTaskModel(backbone=cfg.model.backbone, heads={task.name: task.head}).eval()
    with torch.no_grad():
        outputs = model(task.name, batch['images'])
        predictions = model.heads[task.name].predict(outputs)
    path = save_prediction_grid(tmp_path / f'{name}.png', name, batch['images'], batch['targets'], predictions,
                                task.mean, task.std, task.class_names)
    with Image.open(path) as picture:
        assert picture.size == (round(spec.grid_panels * PANEL_INCHES * DPI), round(2 * PANEL_INCHES * DPI))
    input_size = tuple(batch['images'].shape[-2:])
    sizes = [(input_size[0] + 8, input_size[1] + 4)] * len(samples)  # "original" images larger than the input
    per_image = spec.per_image_predictions(model.heads[task.name], outputs, sizes, input_size, task.class_names)
    assert len(per_image) == len(samples)
    if spec.dense:
        assert all(tuple(prediction.shape[-2:]) == size for prediction, size in zip(per_image, sizes))
    if spec.predictions_differ is not None:
        assert not spec.predictions_differ(predictions, predictions).any()
