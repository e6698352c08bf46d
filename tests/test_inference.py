"""``predict``: image files in, each task's predictions in the original image's frame out, against the evaluator's
own pipeline and against predictions at the network's input size mapped back by hand."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

import mtvision
import mtvision.zoo
from mtvision.data.errors import DataError
from mtvision.engine.evaluator import val_loader
from mtvision.inference import predict
from mtvision.models import build_model
from mtvision.tasks import build_tasks
from mtvision.zoo.api import data_config

ROOT = Path(__file__).resolve().parents[1]
MOE = ROOT / 'configs' / 'quickstart' / 'vit-tiny-p8-moe-e8_4task_synthetic.py'
MIXTURE = ROOT / 'configs' / 'mixture' / 'full-mixture_vit-tiny-p8_600it_synthetic.py'
SHARED = ROOT / 'configs' / 'shared' / 'seg-depth-normals-tags_vit-tiny-p8_600it_synthetic.py'
TIMM_EVAL = [dict(type='ResizeCenterCrop', size=64, crop_pct=0.875, interpolation='bicubic'), dict(type='ToFloat'),
             dict(type='Normalize', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))]


def as_predictor(cfg):
    """The config's model with ``cfg`` and ``data_config``, as ``get_model`` returns it (random weights)."""
    torch.manual_seed(0)
    model = build_model(cfg, build_tasks(cfg.tasks, train=False, val=False))
    model.cfg = cfg
    model.data_config = {task: data_config(task_cfg) for task, task_cfg in cfg.to_dict()['tasks'].items()}
    return model


@pytest.fixture
def model(tiny_config):
    return as_predictor(tiny_config())


def write_images(folder: Path, sizes) -> list[Path]:
    """Random RGB PNGs (lossless, so what predict reads is ``images[i]``) of the given (height, width) sizes."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (height, width) in enumerate(sizes):
        paths.append(folder / f'image{i}.png')
        cv2.imwrite(str(paths[-1]), rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return paths


def network_input(path: Path, size=(64, 64)) -> torch.Tensor:
    """The quick start's validation input, made here with torchvision's functional API and the formula."""
    image = torch.from_numpy(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)).permute(2, 0, 1)
    resized = TF.resize(image, list(size), antialias=True).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return ((resized - mean[:, None, None]) / std[:, None, None])[None]


@pytest.mark.parametrize('pipeline', [None, TIMM_EVAL], ids=['resize', 'timm-eval-crop'])
def test_classification_equals_the_evaluators_pipeline_on_the_validation_files(tiny_config, pipeline):
    options = {} if pipeline is None else {'tasks.cls.val_dataset.pipeline': pipeline}
    cfg = tiny_config(**options)
    model = as_predictor(cfg)
    task = build_tasks({'cls': cfg.tasks['cls']}, train=False)['cls']
    batch = next(iter(val_loader(task, shard=False)))
    model.eval()
    with torch.no_grad():
        expected = model.heads['cls'].predict(model('cls', batch['images']))
    paths = [task.val_dataset.samples[i][0] for i in batch['indices']]
    predictions = predict(model, paths, 'cls', batch_size=3)
    classes = cfg.tasks['cls']['val_dataset']['classes']
    for got, probabilities in zip(predictions, expected):
        scores, ids = probabilities.topk(5)
        assert [entry[0] for entry in got['cls']['topk']] == ids.tolist()
        assert [entry[2] for entry in got['cls']['topk']] == pytest.approx(scores.tolist(), abs=1e-6)
        assert (got['cls']['class_id'], got['cls']['class_name']) == (ids[0].item(), classes[ids[0]])


def test_dense_predictions_have_the_original_size_and_are_the_network_outputs_resized(model, tmp_path):
    paths = write_images(tmp_path, [(50, 70), (64, 64)])
    predictions = predict(model, paths, ['seg', 'depth'])
    model.eval()
    for path, got in zip(paths, predictions):
        size = cv2.imread(str(path)).shape[:2]
        with torch.no_grad():
            x = network_input(path)
            logits = F.interpolate(model('seg', x), size=size, mode='bilinear', align_corners=False)
            log_depth = F.interpolate(model('depth', x), size=size, mode='bilinear', align_corners=False)
        depth_head = model.heads['depth']
        assert got['seg'].shape == got['depth'].shape == size
        assert got['seg'].dtype == torch.long and got['depth'].dtype == torch.float32
        assert not got['seg'].is_inference()  # ordinary tensors: the caller may edit them in place
        assert torch.equal(got['seg'], logits.argmax(dim=1)[0])
        expected_depth = log_depth.exp().clamp(depth_head.min_depth, depth_head.max_depth)[0, 0]
        torch.testing.assert_close(got['depth'], expected_depth)


def test_dense_tasks_are_never_cropped(model, tmp_path):
    paths = write_images(tmp_path, [(50, 70)])
    whole = predict(model, paths, ['seg', 'det'])[0]
    for task in ('seg', 'det'):
        model.data_config[task] = dict(model.data_config[task], crop_pct=0.875, interpolation='bilinear')
    assert torch.equal(predict(model, paths, ['seg', 'det'])[0]['seg'], whole['seg'])


def test_detection_boxes_map_back_to_the_original_pixels(model, tmp_path):
    original, = write_images(tmp_path, [(50, 70)])
    # the network's input, as uint8: predict leaves a 64x64 image as it is, so its boxes are in network pixels
    image = torch.from_numpy(cv2.cvtColor(cv2.imread(str(original)), cv2.COLOR_BGR2RGB)).permute(2, 0, 1)
    at_input = TF.resize(image, [64, 64], antialias=True).permute(1, 2, 0).numpy()
    got, reference = (predict(model, [source], 'det')[0]['det'] for source in (original, at_input))
    assert len(reference['boxes']) > 0
    torch.testing.assert_close(got['boxes'], reference['boxes'] * torch.tensor([70 / 64, 50 / 64] * 2))
    assert torch.equal(got['labels'], reference['labels']) and torch.equal(got['scores'], reference['scores'])
    assert float(got['boxes'][:, 0::2].max()) <= 70 and float(got['boxes'][:, 1::2].max()) <= 50
    assert got['label_names'] is None  # the COCO config lists no classes


def count_backbone_forwards(model) -> list:
    calls = []
    model.backbone.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    return calls


def test_tasks_prepared_alike_share_one_backbone_forward_per_batch(model, tmp_path):
    paths = write_images(tmp_path, [(64, 64)] * 3)
    calls = count_backbone_forwards(model)
    predictions = predict(model, paths, batch_size=2)
    assert calls == [2, 1]  # four tasks, one forward per batch
    assert all(set(p) == {'cls', 'det', 'seg', 'depth'} for p in predictions)
    calls.clear()
    model.data_config['cls'] = dict(model.data_config['cls'], mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    predict(model, paths, batch_size=3)
    assert calls == [3, 3]  # classification normalised its own way, then the three dense tasks


def test_moe_models_route_every_task_in_its_own_forward(tiny_config, tmp_path):
    model = as_predictor(tiny_config(MOE))
    paths = write_images(tmp_path, [(50, 70)])
    calls = count_backbone_forwards(model)
    got = predict(model, paths)[0]
    assert len(calls) == 4
    model.eval()
    with torch.no_grad():
        x = network_input(paths[0])
        expected = model.heads['cls'].predict(model('cls', x))[0]
        shared = model.heads['cls'].predict(model.heads['cls'](model.features('seg', x)))[0]
    assert got['cls']['score'] == pytest.approx(float(expected.max()), abs=1e-6)
    assert not torch.allclose(shared, expected)  # routed for another task, the classifier would see other features


def test_other_task_types_only_when_named(tiny_config, tmp_path):
    model = as_predictor(tiny_config(MIXTURE))
    paths = write_images(tmp_path, [(64, 64), (50, 70)])
    assert set(predict(model, paths[0])[0]) == {'cls', 'det', 'seg', 'depth'}
    predictions = predict(model, paths, ['mae', 'contrastive'])
    for prediction in predictions:
        assert prediction['mae']['images'].shape == (3, 64, 64) and prediction['mae']['mask'].shape == (1, 64, 64)
        assert prediction['contrastive'].ndim == 1
        assert float(prediction['contrastive'].norm()) == pytest.approx(1.0, abs=1e-5)


def test_errors_name_the_file_the_task_and_the_input(model, tmp_path):
    missing = tmp_path / 'nowhere.jpg'
    with pytest.raises(DataError, match='nowhere.jpg'):
        predict(model, missing)
    with pytest.raises(KeyError, match=r"unknown task 'segm'.*'cls', 'depth', 'det', 'seg'"):
        predict(model, np.zeros((8, 8, 3), np.uint8), 'segm')
    with pytest.raises(TypeError, match=r'image 1: .*float32 array'):
        predict(model, [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)])


@pytest.mark.parametrize('training', [True, False])
def test_the_models_mode_is_restored(model, training):
    model.train(training)
    predict(model, np.zeros((40, 30), np.uint8))  # a grayscale array
    assert all(module.training == training for module in model.modules())


def test_the_tool_prints_a_summary_and_writes_json_with_maps_beside_it(model, tmp_path, monkeypatch, load_tool,
                                                                       capsys):
    paths = write_images(tmp_path, [(50, 70)])
    monkeypatch.setattr(mtvision.zoo, 'load_model', lambda spec, config=None: model)
    out = tmp_path / 'out' / 'predictions.json'
    predictions = load_tool('predict').main(['tiny', str(paths[0]), '--out', str(out), '--device', 'cpu'])
    printed = capsys.readouterr().out
    assert 'cls: ' in printed and 'detections with score >= 0.3' in printed and 'depth: min' in printed
    record = json.loads(out.read_text())['images'][0]
    assert record['predictions']['cls']['class_id'] == predictions[0]['cls']['class_id']
    seg = cv2.imread(str(out.parent / record['predictions']['seg']['mask']), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(seg, predictions[0]['seg'].numpy())
    depth = cv2.imread(str(out.parent / record['predictions']['depth']['depth_png']), cv2.IMREAD_UNCHANGED)
    assert depth.dtype == np.uint16 and depth.shape == (50, 70)
    np.testing.assert_allclose(depth / 1000, predictions[0]['depth'].numpy(), atol=5e-4)
    assert len(record['predictions']['det']['boxes']) == len(predictions[0]['det']['boxes'])


def test_predict_is_exported_lazily():
    assert mtvision.predict is predict


def test_the_tool_writes_normals_and_multilabel_predictions_as_their_types_say(tiny_config, tmp_path, monkeypatch,
                                                                               load_tool, capsys):
    from mtvision.data.surface_normals import decode_normals

    shared = as_predictor(tiny_config(SHARED))
    paths = write_images(tmp_path, [(50, 70)])
    monkeypatch.setattr(mtvision.zoo, 'load_model', lambda spec, config=None: shared)
    out = tmp_path / 'out' / 'predictions.json'
    predictions = load_tool('predict').main(['tiny', str(paths[0]), '--out', str(out), '--device', 'cpu'])
    printed = capsys.readouterr().out
    assert 'normals: ' in printed and 'face the camera' in printed and 'tags: ' in printed
    record = json.loads(out.read_text())['images'][0]['predictions']
    normals = predictions[0]['normals']
    assert normals.shape == (3, 50, 70)
    torch.testing.assert_close(normals.norm(dim=0), torch.ones(50, 70))
    stored = cv2.cvtColor(cv2.imread(str(out.parent / record['normals']['normals_png'])), cv2.COLOR_BGR2RGB)
    np.testing.assert_allclose(decode_normals(stored), normals.numpy(), atol=0.01)  # 8-bit quantisation
    tags = predictions[0]['tags']
    assert record['tags']['class_ids'] == tags['class_ids']
    assert record['tags']['class_ids'] == [i for i, p in sorted(enumerate(tags['probabilities'].tolist()),
                                                                key=lambda item: -item[1]) if p >= 0.5]
