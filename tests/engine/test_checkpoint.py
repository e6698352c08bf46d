import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mtvision.checkpoint import (find_last_checkpoint, load_training_state, load_weights, read_shards,
                                 read_weights, resolve_checkpoint, rng_state, save_checkpoint, set_rng_state)


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))


def test_round_trip_weights_and_state(tmp_path):
    model = make_model(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path, 7, model, dict(step=7, optimizer=optimizer.state_dict(), note='x'))
    assert path == tmp_path / 'iter_7' and find_last_checkpoint(tmp_path) == path

    other = make_model(1)
    load_weights(other, tmp_path)
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        torch.testing.assert_close(a, b)
    state = load_training_state(path)
    new_optimizer = torch.optim.AdamW(other.parameters(), lr=0.1)
    new_optimizer.load_state_dict(state['optimizer'])
    exp_avg = optimizer.state_dict()['state'][0]['exp_avg']
    torch.testing.assert_close(new_optimizer.state_dict()['state'][0]['exp_avg'], exp_avg)
    assert state['step'] == 7 and state['note'] == 'x'
    # the weights file is plain safetensors, readable without mtvision
    assert set(load_file(path / 'model.safetensors')) == set(model.state_dict())


def test_keeps_newest_and_leaves_no_temporaries(tmp_path):
    model = make_model(0)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, dict(step=step), max_keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['iter_3', 'iter_4', 'last_checkpoint']
    assert (tmp_path / 'last_checkpoint').read_text() == 'iter_4'


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    model = make_model(0)
    save_checkpoint(tmp_path, 1, model, dict(step=1))
    with pytest.raises(Exception):
        save_checkpoint(tmp_path, 2, model, dict(step=2, bad=lambda: None))  # not serialisable
    assert find_last_checkpoint(tmp_path) == tmp_path / 'iter_1'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['iter_1', 'last_checkpoint']


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    save_checkpoint(tmp_path, 1, make_model(0), dict(step=1))
    wrong = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5))
    with pytest.raises(RuntimeError, match=r"0.weight: checkpoint \(3, 4\) vs model \(5, 4\)"):
        load_weights(wrong, tmp_path)


def test_pth_is_read_weights_only(tmp_path):
    class Payload:
        def __reduce__(self):
            return os.system, ('echo pwned > ' + str(tmp_path / 'pwned'),)

    torch.save({'state_dict': {'w': torch.ones(1)}, 'evil': Payload()}, tmp_path / 'bad.pth')
    with pytest.raises(Exception, match='weights_only|Unsupported global'):
        read_weights(tmp_path / 'bad.pth')
    assert not (tmp_path / 'pwned').exists()
    torch.save({'state_dict': {'w': torch.ones(1)}}, tmp_path / 'good.pth')
    assert read_weights(tmp_path / 'good.pth')['w'].item() == 1.0


def test_resolve_rejects_a_plain_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match='neither a checkpoint'):
        resolve_checkpoint(tmp_path)


def test_the_cuda_generator_state_is_saved_and_restored(monkeypatch, tmp_path):
    """On a GPU, dropout, masks and device-side augmentations draw from the CUDA generator: --resume restores it.
    (Faked here: no CUDA device is needed to check what is written and what is restored.)"""
    device_state = {'state': torch.arange(16, dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_initialized', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_rng_state', lambda: device_state['state'].clone())
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda state: device_state.update(state=state.clone()))
    torch.save(dict(rng=rng_state()), tmp_path / 'state.pth')
    saved = device_state['state']
    device_state['state'] = torch.zeros(16, dtype=torch.uint8)  # the generator moved on
    set_rng_state(torch.load(tmp_path / 'state.pth', weights_only=True)['rng'])
    assert torch.equal(device_state['state'], saved)


def test_sharded_weights_read_back_whole_and_a_missing_shard_is_named(tmp_path):
    """What each rank of a sharded run writes (rows of each sharded tensor; the whole tensors in shard 1 only)."""
    weight, bias, buffer = torch.randn(5, 3), torch.randn(5), torch.arange(4)
    shapes = json.dumps({'fc.weight': [5, 3], 'fc.bias': [5]})
    checkpoint = tmp_path / 'iter_2'
    checkpoint.mkdir()
    # FSDP's split of 5 rows over 2 ranks: 3 and 2
    save_file({'fc.weight': weight[:3], 'fc.bias': bias[:3], 'count': buffer}, checkpoint /
              'model-00001-of-00002.safetensors', {'sharded_shapes': shapes})
    save_file({'fc.weight': weight[3:], 'fc.bias': bias[3:]}, checkpoint / 'model-00002-of-00002.safetensors',
              {'sharded_shapes': shapes})
    (checkpoint / 'training_state.pth').write_bytes(b'')
    whole = read_weights(checkpoint)
    assert whole.keys() == {'fc.weight', 'fc.bias', 'count'}
    assert torch.equal(whole['fc.weight'], weight) and torch.equal(whole['fc.bias'], bias)
    assert torch.equal(whole['count'], buffer)
    (checkpoint / 'model-00002-of-00002.safetensors').unlink()
    with pytest.raises(FileNotFoundError, match=r"missing \['model-00002-of-00002.safetensors'\]"):
        read_shards(checkpoint, 'model')
    save_file({'fc.weight': weight[3:4], 'fc.bias': bias[3:]}, checkpoint / 'model-00002-of-00002.safetensors',
              {'sharded_shapes': shapes})
    with pytest.raises(ValueError, match=r'the shards of fc.weight make \[4, 3\], recorded \[5, 3\]'):
        read_shards(checkpoint, 'model')
