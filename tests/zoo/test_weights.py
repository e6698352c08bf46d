import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mtvision.checkpoint import read_weights
from mtvision.zoo import UnsafeCheckpointError, load_weights_file


def state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {'blocks.0.weight': torch.randn(4, 3, generator=generator),
            'blocks.0.bias': torch.randn(4, generator=generator),
            'steps': torch.tensor(7)}


def assert_same(loaded: dict, expected: dict) -> None:
    assert sorted(loaded) == sorted(expected)  # safetensors stores keys in its own order
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key


@pytest.mark.parametrize('wrap', [
    lambda sd: sd,
    lambda sd: {'state_dict': sd, 'epoch': 3},
    lambda sd: {'model': sd, 'optimizer': {'lr': 0.1}},
    lambda sd: {'model': {'state_dict': sd}},
])
@pytest.mark.parametrize('suffix', ['.pth', '.bin'])
def test_pickled_state_dict(tmp_path, wrap, suffix):
    path = tmp_path / f'w{suffix}'
    torch.save(wrap(state_dict()), path)
    assert_same(load_weights_file(path), state_dict())


def test_agrees_with_read_weights(tmp_path):
    for name, content in [('a.pth', {'model': state_dict(), 'epoch': 1}), ('b.safetensors', state_dict())]:
        if name.endswith('.pth'):
            torch.save(content, tmp_path / name)
        else:
            save_file(content, tmp_path / name)
        assert_same(load_weights_file(tmp_path / name), read_weights(tmp_path / name))


def test_safetensors(tmp_path):
    save_file(state_dict(), tmp_path / 'w.safetensors')
    assert_same(load_weights_file(tmp_path / 'w.safetensors'), state_dict())


@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
def test_code_in_a_pickle_never_runs(tmp_path, legacy, code_running_pickle):
    def save(marker: Path, path: Path) -> None:
        torch.save({'model': state_dict(), 'args': code_running_pickle(marker)}, path,
                   _use_new_zipfile_serialization=not legacy)

    # control: the payload is live, an ordinary unpickling runs it
    pickle.loads(pickle.dumps({'model': state_dict(), 'args': code_running_pickle(tmp_path / 'control-marker')}))
    assert (tmp_path / 'control-marker').read_text() == 'the pickle ran'

    marker = tmp_path / 'marker'
    save(marker, tmp_path / 'evil.pth')
    with pytest.raises(UnsafeCheckpointError) as info:
        load_weights_file(tmp_path / 'evil.pth')
    assert info.value.globals == [code_running_pickle.PLANTED]
    assert code_running_pickle.PLANTED in str(info.value) and str(tmp_path / 'evil.pth') in str(info.value)
    assert isinstance(info.value, pickle.UnpicklingError)
    assert not marker.exists()


def test_trusted_globals_can_be_allowed(tmp_path):
    import argparse
    torch.save({'model': state_dict(), 'args': argparse.Namespace(lr=0.1)}, tmp_path / 'w.pth')
    with pytest.raises(UnsafeCheckpointError, match=r"\['argparse.Namespace'\]"):
        load_weights_file(tmp_path / 'w.pth')
    with torch.serialization.safe_globals([argparse.Namespace]):
        assert_same(load_weights_file(tmp_path / 'w.pth'), state_dict())


def test_bad_files(tmp_path):
    torch.save({'weight': torch.zeros(2), 'epoch': 3, 'note': 'x'}, tmp_path / 'mixed.pth')
    with pytest.raises(ValueError, match=r"'epoch': int, 'note': str"):
        load_weights_file(tmp_path / 'mixed.pth')
    torch.save([torch.zeros(2)], tmp_path / 'list.pt')
    with pytest.raises(ValueError, match='holds a list'):
        load_weights_file(tmp_path / 'list.pt')
    (tmp_path / 'w.npz').write_bytes(b'')
    with pytest.raises(ValueError, match=r"suffix '\.npz'"):
        load_weights_file(tmp_path / 'w.npz')
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        load_weights_file(tmp_path / 'missing.pth')
