"""Fine-tuning starts from a pre-trained run through --load-from: at another image size the position table is
resampled as timm resamples released weights, and a backbone that does not match is an error listing the keys."""
import pytest
import torch
from timm.layers import resample_abs_pos_embed

from mtvision.checkpoint import read_weights
from mtvision.engine import Trainer


@pytest.fixture
def pretrained(tiny_config, tmp_path):
    cfg = tiny_config(**{'train_cfg.max_iters': 1, 'checkpoint_cfg.interval': 1, 'train_cfg.val_at_start': False})
    Trainer(cfg, tmp_path / 'pretrained', validate=False).train()
    return tmp_path / 'pretrained'


def test_fine_tuning_at_another_image_size_resamples_the_position_table(pretrained, tiny_config, tmp_path):
    weights = read_weights(pretrained)
    cfg = tiny_config(**{'model.backbone.img_size': 96})  # 12 x 12 patches of 8 px instead of 8 x 8
    model = Trainer(cfg, tmp_path / 'finetune', load_from=str(pretrained), validate=False).model
    state = model.state_dict()
    expected = resample_abs_pos_embed(weights['backbone.model.pos_embed'], new_size=(12, 12), old_size=(8, 8),
                                      num_prefix_tokens=1)
    assert state['backbone.model.pos_embed'].shape == (1, 1 + 12 * 12, 32)
    torch.testing.assert_close(state['backbone.model.pos_embed'], expected)
    same = [key for key in weights if key != 'backbone.model.pos_embed']
    assert all(torch.equal(state[key], weights[key]) for key in same)  # the heads too: the whole model loaded


def test_a_backbone_that_does_not_match_is_an_error_listing_the_keys(pretrained, tiny_config, tmp_path):
    cfg = tiny_config(**{'model.backbone.depth': 3})
    with pytest.raises(RuntimeError, match=r"does not match the model:\n  missing in checkpoint: "
                                           r"\['backbone.model.blocks.2.attn.proj.bias'"):
        Trainer(cfg, tmp_path / 'finetune', load_from=str(pretrained), validate=False)


def test_fine_tuning_on_other_tasks_loads_the_backbone_and_the_heads_in_common(pretrained, tiny_config, tmp_path):
    weights = read_weights(pretrained)
    cfg = tiny_config()
    cfg.tasks = {'cls': cfg.tasks['cls'], 'cls2': dict(cfg.tasks['cls'])}  # cls as pre-trained, cls2 new
    model = Trainer(cfg, tmp_path / 'finetune', load_from=str(pretrained), validate=False).model
    state = model.state_dict()
    for key in state:
        if key.startswith(('backbone.', 'heads.cls.')):
            assert torch.equal(state[key], weights[key]), key
    fresh = Trainer(cfg, tmp_path / 'fresh', validate=False).model.state_dict()  # the same seed, no weights
    assert all(torch.equal(state[key], fresh[key]) for key in state if key.startswith('heads.cls2.'))
    # a head of the same name that does not fit is an error naming its keys
    from mtvision.models import build_model
    from mtvision.tasks import build_tasks
    from mtvision.zoo import load_pretrained

    cfg.tasks['cls'] = dict(cfg.tasks['cls'], head=dict(cfg.tasks['cls']['head'], num_classes=9))
    other = build_model(cfg, build_tasks(cfg.tasks, train=False, val=False))
    with pytest.raises(RuntimeError, match=r'fc.weight: checkpoint \(6, 32\) vs model \(9, 32\)'):
        load_pretrained(other, pretrained)


@pytest.mark.parametrize('recipe, task, key', [('cls_vit-tiny-p8_300it_synthetic.py', 'cls', 'top1'),
                                               ('mask-rcnn_vit-tiny-p8_300it_synthetic.py', 'inst', 'mAP_segm')])
def test_the_embedded_fine_tuning_recipes_train_from_a_multi_task_run(pretrained, tiny_config, tmp_path, recipe, task,
                                                                       key):
    cfg = tiny_config(f'configs/finetune/{recipe}',
                      **{'train_cfg.max_iters': 2, 'train_cfg.val_interval': 2, 'train_cfg.val_at_start': False,
                         'checkpoint_cfg.interval': 2})
    trainer = Trainer(cfg, tmp_path / 'finetune', load_from=str(pretrained))
    weights = read_weights(pretrained)
    state = trainer.model.state_dict()
    loaded = [name for name in state if name.startswith('backbone.') or name.startswith(f'heads.{task}.') and
              name in weights]
    assert all(torch.equal(state[name], weights[name]) for name in loaded)
    assert len({group['lr'] for group in trainer.optimizer.param_groups}) > 2  # layer decay: a rate per depth
    metrics = trainer.train()
    assert 0 <= metrics[task][key] <= 100
