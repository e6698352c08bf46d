import json

import pytest
import torch

from mtvision.engine import Trainer

from mtvision.checkpoint import load_training_state, read_weights
from mtvision.engine.logging import latest_run_dir
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(cfg, work_dir, **kwargs):
    trainer = Trainer(cfg, work_dir, **kwargs)
    return trainer, trainer.train()


def assert_same_weights(a, b):
    a, b = read_weights(a), read_weights(b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize('mixer', [{'mixer.strategy': 'all'},
                                   {'mixer.strategy': 'temperature', 'mixer.temperature': 2.0}])
def test_resume_reproduces_the_uninterrupted_run(tiny_config, tmp_path, mixer):
    options = {'train_cfg.max_iters': 4, 'train_cfg.val_interval': 100, 'checkpoint_cfg.interval': 2,
               'checkpoint_cfg.max_keep': 5, **mixer}
    full, _ = run(tiny_config(**options), tmp_path / 'full', validate=False)
    assert sorted(p.name for p in (tmp_path / 'full').glob('iter_*')) == ['iter_2', 'iter_4']

    resumed = Trainer(tiny_config(**options), tmp_path / 'resumed', resume=str(tmp_path / 'full' / 'iter_2'),
                      validate=False)
    assert resumed.step == 2 and resumed.mixer.step == 2
    assert resumed.samples_drawn == {name: 2 * count for name, count in resumed.mixer.draw_counts.items()}
    assert sum(resumed.mixer.draw_counts.values()) == (8 if mixer['mixer.strategy'] == 'all' else 2)
    half_state = load_training_state(tmp_path / 'full' / 'iter_2')['optimizer']['state']
    assert half_state and all(torch.equal(resumed.optimizer.state_dict()['state'][i]['exp_avg'],
                                          half_state[i]['exp_avg']) for i in half_state)
    resumed.train()
    assert_same_weights(tmp_path / 'full' / 'iter_4', tmp_path / 'resumed' / 'iter_4')
    # the scalars file of the resumed run continues the interrupted one
    steps = [json.loads(line)['step'] for line in (resumed.run_dir / 'scalars.jsonl').read_text().splitlines()]
    assert steps == [3, 4]


def test_auto_resume_picks_the_last_checkpoint(tiny_config, tmp_path):
    run(tiny_config(**{'train_cfg.max_iters': 2}), tmp_path, validate=False)
    trainer = Trainer(tiny_config(**{'train_cfg.max_iters': 3}), tmp_path, resume='auto', validate=False)
    assert trainer.step == 2
    fresh = Trainer(tiny_config(), tmp_path / 'empty', resume='auto', validate=False)
    assert fresh.step == 0


def test_load_from_takes_weights_only(tiny_config, tmp_path):
    run(tiny_config(**{'train_cfg.max_iters': 1}), tmp_path / 'a', validate=False)
    trainer = Trainer(tiny_config(), tmp_path / 'b', load_from=str(tmp_path / 'a'), validate=False)
    assert trainer.step == 0 and not trainer.optimizer.state_dict()['state']
    source = read_weights(tmp_path / 'a')
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, source[name]), name


def test_test_tool_reproduces_the_final_evaluation(tiny_config, tmp_path, load_tool):
    cfg = tiny_config(**{'train_cfg.max_iters': 2, 'train_cfg.val_interval': 2})
    trainer, results = run(cfg, tmp_path / 'train')
    assert set(results) == {'cls', 'det', 'seg', 'depth'}
    saved = json.loads((tmp_path / 'train' / 'metrics.json').read_text())
    assert saved['step'] == 2 and saved['metrics']['cls']['top1'] == results['cls']['top1']
    cfg.dump(str(tmp_path / 'config.py'))
    tested = load_tool('test').main([str(tmp_path / 'config.py'), str(tmp_path / 'train'), '--work-dir',
                                     str(tmp_path / 'test'), '--no-pictures'])
    for task, values in results.items():
        for key, value in values.items():
            assert tested[task][key] == pytest.approx(value, nan_ok=True), (task, key)


def test_head_class_count_must_match_the_dataset(tiny_config, tmp_path):
    with pytest.raises(ValueError, match=r'tasks.cls.head.num_classes=5 but the train dataset has 6 classes'):
        Trainer(tiny_config(**{'tasks.cls.head.num_classes': 5}), tmp_path, validate=False)


@pytest.mark.parametrize('key, where', [('tasks.det.head.nms_threshh', 'tasks.det.head'),
                                        ('model.backbone.deptth', 'model.backbone'),
                                        ('tasks.seg.train_dataset.img_dirr', 'tasks.seg.train_dataset')])
def test_unknown_component_arguments_name_their_place(tiny_config, tmp_path, key, where):
    with pytest.raises(TypeError) as error:
        Trainer(tiny_config(**{key: 1}), tmp_path, validate=False)
    assert str(error.value).startswith(f'{where}:') and key.rsplit('.', 1)[1] in str(error.value)


def test_mae_beside_the_supervised_tasks_trains_and_resumes_exactly(tiny_config, tmp_path):
    config = ROOT / 'configs' / 'mae' / 'mae-4task_vit-tiny-p8_600it_synthetic.py'
    options = {'train_cfg.max_iters': 4, 'train_cfg.val_interval': 4, 'checkpoint_cfg.interval': 2,
               'checkpoint_cfg.max_keep': 5}
    _, results = run(tiny_config(config, **options), tmp_path / 'full')
    assert set(results) == {'cls', 'det', 'seg', 'depth', 'mae'} and results['mae']['mse_masked'] > 0
    # the masks are drawn from the checkpointed RNG: a resumed run masks exactly as the uninterrupted one did;
    # evaluation draws from its own stream, so a run without it trains to the same weights
    run(tiny_config(config, **options), tmp_path / 'resumed', resume=str(tmp_path / 'full' / 'iter_2'),
        validate=False)
    assert_same_weights(tmp_path / 'full' / 'iter_4', tmp_path / 'resumed' / 'iter_4')
    evaluated_midway = {**options, 'train_cfg.val_interval': 1}
    run(tiny_config(config, **evaluated_midway), tmp_path / 'evaluated')
    assert_same_weights(tmp_path / 'full' / 'iter_4', tmp_path / 'evaluated' / 'iter_4')


def test_full_mixture_trains_every_objective_and_mocov3_resumes_exactly(tiny_config, tmp_path):
    options = {'train_cfg.max_iters': 4, 'train_cfg.val_interval': 4, 'checkpoint_cfg.interval': 2,
               'checkpoint_cfg.max_keep': 5}
    mixture = ROOT / 'configs' / 'mixture' / 'full-mixture_vit-tiny-p8_600it_synthetic.py'
    mixture_run, results = run(tiny_config(mixture, **options), tmp_path / 'mixture')
    assert set(results) == {'cls', 'det', 'seg', 'depth', 'mae', 'contrastive'}
    assert 0 <= results['contrastive']['top1'] <= 100
    records = [json.loads(line) for line in (mixture_run.run_dir / 'scalars.jsonl').read_text().splitlines()]
    last_train = [record for record in records if 'loss/total' in record][-1]
    assert all(f'loss/{task}' in last_train for task in results)

    # MoCo v3: the momentum encoder is part of the checkpoint, so a resumed run ends on the same weights
    moco = ROOT / 'configs' / 'contrastive' / 'mocov3_vit-tiny-p8_600it_synthetic.py'
    full, _ = run(tiny_config(moco, **options), tmp_path / 'full', validate=False)
    run(tiny_config(moco, **options), tmp_path / 'resumed', resume=str(tmp_path / 'full' / 'iter_2'),
        validate=False)
    assert_same_weights(tmp_path / 'full' / 'iter_4', tmp_path / 'resumed' / 'iter_4')
    weights = read_weights(tmp_path / 'full' / 'iter_4')
    momentum_keys = [key for key in weights if key.startswith('momentum_backbones.contrastive.')]
    assert momentum_keys and all(not torch.equal(weights[key], weights[key.replace(
        'momentum_backbones.contrastive.', 'backbone.')]) for key in momentum_keys if key.endswith('cls_token'))


def test_dino_with_ibot_trains_from_its_config_and_resumes_exactly(tiny_config, tmp_path):
    """Multi-crop batches (two global and four local crops), the momentum teacher, the centres and the iBOT masks
    (drawn from the checkpointed RNG) all resume: the resumed run ends on the uninterrupted run's weights."""
    options = {'train_cfg.max_iters': 4, 'train_cfg.val_interval': 4, 'checkpoint_cfg.interval': 2,
               'checkpoint_cfg.max_keep': 5, 'tasks.dino.head.freeze_last_layer_iters': 2}
    dino = ROOT / 'configs' / 'dino' / 'dino_vit-tiny-p8_600it_synthetic.py'
    full, results = run(tiny_config(dino, **options), tmp_path / 'full')
    assert 0 <= results['dino']['top1'] <= 100
    run(tiny_config(dino, **options), tmp_path / 'resumed', resume=str(tmp_path / 'full' / 'iter_2'),
        validate=False)
    assert_same_weights(tmp_path / 'full' / 'iter_4', tmp_path / 'resumed' / 'iter_4')
    weights = read_weights(tmp_path / 'full' / 'iter_4')
    assert weights['heads.dino.center'].abs().sum() > 0 and weights['heads.dino.patch_center'].abs().sum() > 0
    assert not torch.equal(weights['heads.dino.teacher.prototypes'], weights['heads.dino.student.prototypes'])
    assert not torch.equal(weights['momentum_backbones.dino.model.cls_token'], weights['backbone.model.cls_token'])


TINY_SWIN = {'model.backbone.embed_dim': 16, 'model.backbone.depths': (1, 1, 1, 1)}


def test_swin_backbone_serves_every_head_and_simmim_through_config_alone(tiny_config, tmp_path):
    config = ROOT / 'configs' / 'quickstart' / 'swin-tiny-w4_4task_synthetic.py'
    cfg = tiny_config(config, tiny_model=TINY_SWIN, **{'train_cfg.max_iters': 2, 'train_cfg.val_interval': 2})
    simmim = tiny_config(ROOT / 'configs' / 'simmim' / 'simmim_swin-tiny-w4_600it_synthetic.py', tiny_model=TINY_SWIN)
    cfg.tasks['simmim'] = simmim.tasks['simmim']
    trainer, results = run(cfg, tmp_path)
    assert set(results) == {'cls', 'det', 'seg', 'depth', 'simmim'}
    assert trainer.model.backbone.out_strides == [4, 8, 16, 32]
    assert results['simmim']['mse_masked'] > 0 and 0 <= results['seg']['mIoU'] <= 100
    # the mask token learns from the SimMIM task only; it moved
    assert trainer.model.backbone.mask_token.grad is not None


MOE = {'model.backbone.moe': dict(blocks='every_other', num_experts=4, top_k=2),
       'model.moe_loss_weights.mutual_information': 0.01}


def test_moe_quick_start_logs_routing_draws_usage_and_resumes_exactly(tiny_config, tmp_path):
    config = ROOT / 'configs' / 'quickstart' / 'vit-tiny-p8-moe-e8_4task_synthetic.py'
    options = {**MOE, 'train_cfg.max_iters': 4, 'train_cfg.val_interval': 4, 'checkpoint_cfg.interval': 2,
               'checkpoint_cfg.max_keep': 5, 'log_cfg.visualize': True}
    trainer, results = run(tiny_config(config, **options), tmp_path / 'full')
    assert set(results) == {'cls', 'det', 'seg', 'depth'}
    records = [json.loads(line) for line in (trainer.run_dir / 'scalars.jsonl').read_text().splitlines()]
    train = [record for record in records if 'loss/total' in record][-1]
    for task in results:
        assert {f'{task}/loss_moe_balance', f'{task}/loss_moe_z', f'{task}/loss_moe_mi'} <= set(train)
        # blocks 1 of a depth-2 ViT is the MoE block; every task routed 2 of 4 experts per token, shares sum to 1
        shares = [train[f'moe/blocks.1.mlp/{task}/expert_{e}'] for e in range(4)]
        assert sum(shares) == pytest.approx(1.0) and train[f'moe/dropped/{task}'] == 0
    validation = [record for record in records if 'val/cls/top1' in record][-1]
    assert sum(validation[f'val/moe/blocks.1.mlp/det/expert_{e}'] for e in range(4)) == pytest.approx(1.0)
    assert (tmp_path / 'full' / 'pictures' / 'expert_usage_iter_4.png').stat().st_size > 0

    run(tiny_config(config, **options), tmp_path / 'resumed', resume=str(tmp_path / 'full' / 'iter_2'),
        validate=False)
    assert_same_weights(tmp_path / 'full' / 'iter_4', tmp_path / 'resumed' / 'iter_4')


def test_swin_moe_trains_all_four_supervised_heads(tiny_config, tmp_path):
    config = ROOT / 'configs' / 'quickstart' / 'swin-tiny-w4_4task_synthetic.py'
    cfg = tiny_config(config, tiny_model={**TINY_SWIN, 'model.backbone.depths': (1, 1, 2, 1)},
                      **{'model.backbone.moe': dict(blocks='every_other', num_experts=4, top_k=2, router='shared'),
                         'train_cfg.max_iters': 2})
    trainer, _ = run(cfg, tmp_path, validate=False)
    layers = trainer.model.expert_statistics()
    # blocks are counted across stages: 1 and 3 of the five are stage 1's first and stage 2's second
    assert list(layers) == ['layers.1.blocks.0.mlp', 'layers.2.blocks.1.mlp']
    moe = trainer.model.backbone.model.layers[2].blocks[1].mlp
    assert moe.w1.shape[0] == 4 and moe.router_type == 'shared'
    # every task's loss reached the shared router through its own task embedding
    assert all(layer.task_embed.weight.grad[i].abs().sum() > 0 for layer in (moe,) for i in range(4))


def test_weight_ema_follows_its_formula_is_checkpointed_and_resumes_exactly(tiny_config, tmp_path):
    options = {'ema_cfg': dict(decay=0.9), 'train_cfg.max_iters': 4, 'checkpoint_cfg.interval': 1,
               'checkpoint_cfg.max_keep': 10}
    full, _ = run(tiny_config(**options), tmp_path / 'full', validate=False)
    # ema_n = 0.9 ema_{n-1} + 0.1 w_n, starting from the initial weights (ema_0 = w_0)
    for step in (2, 3, 4):
        previous = read_weights(tmp_path / 'full' / f'iter_{step - 1}' / 'ema.safetensors')
        weights = read_weights(tmp_path / 'full' / f'iter_{step}')
        ema = read_weights(tmp_path / 'full' / f'iter_{step}' / 'ema.safetensors')
        key = 'backbone.model.blocks.0.attn.qkv.weight'
        torch.testing.assert_close(ema[key], previous[key].lerp(weights[key], 0.1))
        assert not torch.equal(ema[key], weights[key])
    run(tiny_config(**options), tmp_path / 'resumed', resume=str(tmp_path / 'full' / 'iter_2'), validate=False)
    for name in ('model.safetensors', 'ema.safetensors'):
        assert_same_weights(tmp_path / 'full' / 'iter_4' / name, tmp_path / 'resumed' / 'iter_4' / name)


def test_load_from_a_backbone_file_initialises_the_backbone_and_leaves_the_heads_fresh(tiny_config, tmp_path):
    from safetensors.torch import save_file

    source, _ = run(tiny_config(**{'train_cfg.max_iters': 1}), tmp_path / 'source', validate=False)
    backbone = {f'backbone.{k}': v.contiguous() for k, v in source.model.backbone.state_dict().items()}
    save_file(backbone, tmp_path / 'backbone.safetensors')
    torch.manual_seed(123)  # a different initialisation, which the file overwrites for the backbone only
    trainer = Trainer(tiny_config(**{'randomness.seed': 7}), tmp_path / 'target',
                      load_from=str(tmp_path / 'backbone.safetensors'), validate=False)
    for key, value in source.model.backbone.state_dict().items():
        assert torch.equal(trainer.model.backbone.state_dict()[key], value), key
    assert not torch.equal(trainer.model.heads['cls'].fc.weight, source.model.heads['cls'].fc.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='the CUDA generator exists only on a CUDA device')
def test_resume_on_cuda_reproduces_the_uninterrupted_run_with_random_draws_on_the_device(tiny_config, tmp_path):
    """Stochastic depth draws on the GPU: without the CUDA generator in the checkpoint the resumed run drops other
    blocks. One classification task (no kernels with atomic accumulation), so equality is bitwise."""
    options = {'train_cfg.max_iters': 4, 'checkpoint_cfg.interval': 2, 'checkpoint_cfg.max_keep': 5,
               'model.backbone.drop_path_rate': 0.5, 'env_cfg.device': 'cuda'}

    def classification_only():
        cfg = tiny_config(**options)
        cfg.tasks = {'cls': cfg.tasks['cls']}
        return cfg
    run(classification_only(), tmp_path / 'full', validate=False)
    Trainer(classification_only(), tmp_path / 'resumed', resume=str(tmp_path / 'full' / 'iter_2'),
            validate=False).train()
    assert_same_weights(tmp_path / 'full' / 'iter_4', tmp_path / 'resumed' / 'iter_4')


def test_every_log_interval_writes_a_line_to_train_log_and_timings_to_the_scalars(tiny_config, tmp_path,
                                                                                   restore_logging):
    from mtvision.engine.logging import setup_logging

    setup_logging(tmp_path)
    run(tiny_config(**{'train_cfg.max_iters': 4, 'log_cfg.interval': 2}), tmp_path, validate=False)
    lines = [line for line in (tmp_path / 'train.log').read_text().splitlines() if ' iter ' in line]
    assert [line.split(' iter ')[1].split()[0] for line in lines] == ['2/4', '4/4']
    assert all(f' {task} ' in lines[-1] for task in ('cls', 'det', 'seg', 'depth')) and 'eta ' in lines[-1]
    records = [json.loads(line) for line in (latest_run_dir(tmp_path) / 'scalars.jsonl').read_text().splitlines()]
    assert [r['step'] for r in records] == [2, 4]
    assert all(r['time'] > 0 and 0 <= r['data_time'] <= r['time'] and r['images_per_s'] > 0 for r in records)


def test_the_optimizer_sees_every_gradient_laid_out_as_its_parameter(tiny_config, tmp_path, monkeypatch):
    """Autograd gives a 1x1 convolution's weight gradient channels-last strides; torch's fused AdamW, the default on
    CUDA, refuses a gradient whose strides differ from its parameter's (pytorch/pytorch#106951)."""
    trainer = Trainer(tiny_config(**{'train_cfg.max_iters': 1}), tmp_path, validate=False)
    assert any(module.kernel_size == (1, 1) for module in trainer.model.modules()
               if isinstance(module, torch.nn.Conv2d))  # the segmentation and depth predictors
    mismatched = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        mismatched.extend(name for name, p in trainer.model.named_parameters()
                          if p.grad is not None and p.grad.stride() != p.stride())
        return step(*args, **kwargs)
    monkeypatch.setattr(trainer.optimizer, 'step', recording_step)
    trainer.train()
    assert trainer.step == 1 and mismatched == []


def test_resume_without_a_checkpoint_warns_that_training_starts_from_scratch(tiny_config, tmp_path, caplog):
    """A mistyped work dir given to --resume must not retrain silently."""
    with caplog.at_level('WARNING', logger='mtvision'):
        trainer = Trainer(tiny_config(**{'train_cfg.max_iters': 1}), tmp_path / 'typo', resume='auto',
                          validate=False)
    assert trainer.step == 0
    assert any(record.levelname == 'WARNING' and 'no checkpoint in' in record.message and 'typo' in record.message
               for record in caplog.records), caplog.text
