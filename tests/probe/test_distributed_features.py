import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtvision.data import ImageFolderDataset, generate_synthetic
from mtvision.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mtvision.models.backbones.vit import ViT
from mtvision.probe.features import cached_features, extract_features

WORLD_SIZE = 2
PIPELINE = [dict(type='ToFloat'), dict(type='Normalize', mean=IMAGENET_MEAN, std=IMAGENET_STD)]


def tiny_backbone() -> ViT:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return ViT(model_name='vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=2,
                   num_heads=2).eval()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def extract_on_rank(rank: int, port: int, data_root: Path, out_dir: Path) -> None:
    """One rank: extract, then extract through the cache twice; save what it got and how many images it ran."""
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=WORLD_SIZE)
    try:
        backbone = tiny_backbone()
        dataset = ImageFolderDataset(data_root, PIPELINE)
        features = extract_features(backbone, dataset, n_blocks=2, batch_size=2, progress=False)
        images_seen = []
        original = backbone.model.forward_intermediates
        backbone.model.forward_intermediates = lambda images, **kwargs: (images_seen.append(len(images))
                                                                         or original(images, **kwargs))
        cache_dir, key = out_dir / 'cache', dict(model='tiny')
        cached_features(backbone, dataset, cache_dir, key, n_blocks=2, batch_size=2, progress=False)
        images_first = sum(images_seen)
        reloaded = cached_features(backbone, dataset, cache_dir, key, n_blocks=2, batch_size=2, progress=False)
        torch.save(dict(cls_tokens=features.cls_tokens, avgpool=features.avgpool, labels=features.labels,
                        reloaded_avgpool=reloaded.avgpool.clone(), images_first=images_first,
                        images_second=sum(images_seen) - images_first), out_dir / f'rank{rank}.pt')
    finally:
        dist.destroy_process_group()


def test_two_ranks_gather_the_single_process_features_in_dataset_order(tmp_path):
    generate_synthetic(tmp_path / 'data', seed=0, num_train=7, num_val=3, image_size=32, num_classes=3)
    data_root = tmp_path / 'data' / 'classification' / 'train'
    mp.spawn(extract_on_rank, args=(free_port(), data_root, tmp_path), nprocs=WORLD_SIZE, join=True)

    expected = extract_features(tiny_backbone(), ImageFolderDataset(data_root, PIPELINE), n_blocks=2,
                                batch_size=7, progress=False)
    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f'rank{rank}.pt', weights_only=True)
        # 7 images: rank 0 extracts indices 0, 2, 4, 6 and rank 1 indices 1, 3, 5
        torch.testing.assert_close(result['cls_tokens'], expected.cls_tokens, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result['avgpool'], expected.avgpool, atol=1e-5, rtol=1e-5)
        assert torch.equal(result['labels'], expected.labels)
        assert result['images_first'] == (4 if rank == 0 else 3)
        assert result['images_second'] == 0
        torch.testing.assert_close(result['reloaded_avgpool'], expected.avgpool, atol=1e-5, rtol=1e-5)
