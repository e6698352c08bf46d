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
