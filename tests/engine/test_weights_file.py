"""``save_weights_file``: the same tensors and metadata give the same bytes, which safetensors reads back exactly."""
import hashlib
import json
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mtvision.checkpoint import save_weights_file


def weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        'blocks.0.attn.qkv.weight': torch.randn(6, 4, generator=generator),
        'blocks.0.attn.qkv.bias': torch.randn(6, generator=generator).to(torch.bfloat16),
        'norm.weight': torch.randn(3, generator=generator).to(torch.float16),
        'position_ids': torch.arange(5),
        'count': torch.tensor(7, dtype=torch.int64),  # 0-dim
        'scale': torch.tensor(0.5, dtype=torch.bfloat16),  # 0-dim, 2 bytes: what follows is not 8-byte aligned
        'keep': torch.tensor([True, False, True]),  # 3 bytes
        'empty': torch.empty(0, 4),
        'strided': torch.randn(4, 6, generator=generator).double()[:, ::2],  # not contiguous
        'codes': torch.tensor([[1, -2], [3, -4]], dtype=torch.int8),
    }


def metadata(order: int) -> dict[str, str]:
    items = [('format', 'mtvision'), ('step', '12'), ('backbone', json.dumps({'type': 'ViT', 'depth': 2})),
             ('config', 'é ünïcode'), ('a', '')]
    return dict(items if order == 0 else reversed(items))


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_equal_weights_and_metadata_give_equal_bytes(tmp_path):
    save_weights_file(tmp_path / 'first.safetensors', weights(), metadata(0))
    # the same tensors inserted in the other order, copies of the same values, metadata built in the other order
    second = {name: tensor.clone() for name, tensor in reversed(list(weights().items()))}
    save_weights_file(tmp_path / 'second.safetensors', second, metadata(1))
    assert sha256(tmp_path / 'first.safetensors') == sha256(tmp_path / 'second.safetensors')
    # and different values give different bytes (the hash is of the contents, not only of the names)
    changed = dict(second, **{'keep': torch.tensor([True, True, True])})
    save_weights_file(tmp_path / 'changed.safetensors', changed, metadata(1))
    assert sha256(tmp_path / 'changed.safetensors') != sha256(tmp_path / 'first.safetensors')


def test_safetensors_reads_it_back_exactly(tmp_path):
    path = tmp_path / 'model.safetensors'
    save_weights_file(path, weights(), metadata(1))
    loaded = load_file(path)
    assert loaded.keys() == weights().keys()
    for name, tensor in weights().items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name
    with safe_open(path, 'pt') as f:
        assert f.metadata() == metadata(0)
    # safetensors' own writer of the same tensors loads to the same values
    reference = tmp_path / 'reference.safetensors'
    save_file({name: tensor.contiguous() for name, tensor in weights().items()}, reference, metadata=metadata(0))
    for name, tensor in load_file(reference).items():
        assert torch.equal(tensor, loaded[name]) and tensor.dtype == loaded[name].dtype, name


def test_header_layout(tmp_path):
    path = tmp_path / 'model.safetensors'
    save_weights_file(path, weights(), metadata(1))
    data = path.read_bytes()
    length = int.from_bytes(data[:8], 'little')
    assert length % 8 == 0
    header = json.loads(data[8:8 + length])
    assert list(header['__metadata__']) == sorted(metadata(0))
    offsets = [entry['data_offsets'] for name, entry in header.items() if name != '__metadata__']
    # the tensors fill the data without gaps, each at a multiple of its element size
    assert [begin for begin, _ in offsets] == [0] + [end for _, end in offsets[:-1]]
    assert offsets[-1][1] == len(data) - 8 - length
    sizes = {'F64': 8, 'I64': 8, 'F32': 4, 'F16': 2, 'BF16': 2, 'I8': 1, 'BOOL': 1}
    assert all(begin % sizes[header[name]['dtype']] == 0
               for name, (begin, _) in zip([n for n in header if n != '__metadata__'], offsets))


def test_no_metadata_and_the_file_mode(tmp_path):
    path = tmp_path / 'model.safetensors'
    save_weights_file(path, {'w': torch.ones(2)})
    with safe_open(path, 'pt') as f:
        assert f.metadata() is None
    # the mode open() gives, like every file mtvision writes, and no temporary file left beside it
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ['model.safetensors']


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    path = tmp_path / 'model.safetensors'
    with pytest.raises(TypeError, match=r"model.safetensors: tensor 'z' has dtype torch.complex128"):
        save_weights_file(path, {'a': torch.ones(1), 'z': torch.ones(1, dtype=torch.complex128)})
    with pytest.raises(TypeError, match='metadata must map strings to strings'):
        save_weights_file(path, {'a': torch.ones(1)}, {'step': 3})
    assert list(tmp_path.iterdir()) == []
