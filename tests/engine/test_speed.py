"""Speed switches of env_cfg: the torch flags they set, the compile plumbing (torch.compile itself is replaced by a
recorder: a real compile takes tens of seconds on CPU) and the FSDP2 options."""
import pytest
import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

from mtvision.config import ConfigError, check_config
from mtvision.engine.speed import apply_speed_settings, compile_backbone, compile_options, fsdp_options
from mtvision.models.backbones import Swin, ViT

FLAGS = ('torch.backends.cuda.matmul.allow_tf32', 'torch.backends.cudnn.allow_tf32', 'torch.backends.cudnn.benchmark')


@pytest.fixture
def restored_flags():
    """The process-wide flags as they were before the test, whatever it set."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
     torch.backends.cudnn.benchmark) = saved


def flags() -> tuple[bool, bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark


@pytest.mark.parametrize('env_cfg, expected', [
    ({}, (True, True, False)),  # the defaults: TF32 on, no cuDNN autotuning
    (dict(tf32=False), (False, False, False)),
    (dict(tf32=True, cudnn_benchmark=True), (True, True, True)),
    (dict(tf32=False, cudnn_benchmark=True, device='cpu'), (False, False, True)),
])
def test_flags_follow_the_config(restored_flags, env_cfg, expected):
    # start from the opposite of what is expected, so every flag must be written
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
     torch.backends.cudnn.benchmark) = (not value for value in expected)
    message = apply_speed_settings(env_cfg)
    assert flags() == expected
    assert message == (f'speed: TF32 {"on" if expected[0] else "off"}, '
                       f'cudnn.benchmark {"on" if expected[2] else "off"}')


def test_bad_flags_are_errors_naming_the_key(restored_flags):
    before = flags()
    with pytest.raises(TypeError, match=r"env_cfg.tf32 must be True or False, got 'yes'"):
        apply_speed_settings(dict(tf32='yes'))
    with pytest.raises(ValueError, match='randomness.deterministic'):
        apply_speed_settings(dict(cudnn_benchmark=True), deterministic=True)
    assert flags() == before  # nothing half-set


def test_the_switches_are_known_config_keys():
    check_config(dict(env_cfg=dict(tf32=False, cudnn_benchmark=True, compile=dict(mode='max-autotune'),
                                   fsdp=True, fsdp_cfg=dict(mixed_precision='bf16'))))
    with pytest.raises(ConfigError, match='env_cfg.*tf23'):
        check_config(dict(env_cfg=dict(tf23=True)))


def tiny_backbones():
    return [ViT('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2),
            Swin('swin_tiny_patch4_window7_224', img_size=32, window_size=4, embed_dim=16, depths=(2, 1),
                 num_heads=(1, 2), out_indices=(0, 1))]


@pytest.mark.parametrize('compile_cfg, expected', [
    (True, {}), (dict(mode='max-autotune', dynamic=False), dict(mode='max-autotune', dynamic=False))])
def test_compile_compiles_each_block_in_place_and_keeps_the_names(monkeypatch, compile_cfg, expected):
    # nn.Module.compile calls torch.compile(self._call_impl, **options): record instead of compiling
    calls = []
    monkeypatch.setattr(torch, 'compile', lambda fn, **options: calls.append((fn, options)) or fn)
    for backbone in tiny_backbones():
        names = list(backbone.state_dict())
        calls.clear()
        assert compile_backbone(backbone, dict(compile=compile_cfg)) == len(backbone.mlp_blocks())
        assert [fn.__self__ for fn, _ in calls] == backbone.mlp_blocks()
        assert all(options == expected for _, options in calls)
        assert list(backbone.state_dict()) == names  # no '_orig_mod.': checkpoints keep their keys


def test_compile_off_by_default_and_bad_options_named(monkeypatch):
    monkeypatch.setattr(torch, 'compile', lambda *args, **kwargs: pytest.fail('compiled'))
    backbone = tiny_backbones()[0]
    assert compile_backbone(backbone, {}) == 0
    assert compile_backbone(backbone, dict(compile=False)) == 0
    with pytest.raises(KeyError, match="env_cfg.compile has unknown keys \\['mdoe'\\]"):
        compile_options(dict(compile=dict(mdoe='max-autotune')))
    with pytest.raises(TypeError, match='env_cfg.compile must be'):
        compile_options(dict(compile='inductor'))


def test_fsdp_options():
    assert fsdp_options(None, world_size=2, device_type='cpu') == dict(reshard_after_forward=True)
    options = fsdp_options(dict(mixed_precision='bf16', reshard_after_forward=False), 2, 'cpu')
    assert options == dict(reshard_after_forward=False, mp_policy=MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    with pytest.raises(ValueError, match='mixed_precision must be None or one of'):
        fsdp_options(dict(mixed_precision='fp16'), 2, 'cpu')
    with pytest.raises(ValueError, match='shard_size must be a positive int dividing the world size 4'):
        fsdp_options(dict(shard_size=3), 4, 'cpu')
    with pytest.raises(KeyError, match='fsdp_cfg has unknown keys'):
        fsdp_options(dict(hybrid=True), 2, 'cpu')
