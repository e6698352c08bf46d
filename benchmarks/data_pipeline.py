"""Data pipeline throughput per CPU core: each task pipeline of the real 224 px recipe, before and after.

Before: ``ToFloat`` + ``Normalize`` in the worker (float32 batches to pickle, pin and copy), MoCo v3's views both
blurred by torchvision's 23 x 23 convolution, no ``RandomApply``. After: uint8 batches normalised on the device,
MoCo v3's asymmetric views (``RandomApply`` colour jitter and blur, solarize) blurred by OpenCV. A worker's whole
job is timed: read and transform the samples, collate, and hand the batch to the main process (ForkingPickler moves
its tensors into shared memory, a copy of every byte). One process on one thread (as each DataLoader worker runs),
so images/s is per CPU core. The normalisation the main process (or the GPU) then does is timed apart.

Images are synthetic at real sizes: ImageNet-like 500 x 375 JPEGs, COCO-like 640 x 480 JPEGs with boxes, ADE20K-like
683 x 512 JPEGs with PNG label maps, NYUv2-like 640 x 480 PNGs with uint16 depth. Also measured: the memory of a
classification index of 1.28M entries as a list of ``(Path, label)`` tuples (before) and as a ``SampleTable``, and
what a forked worker copies of it by reading it and running the garbage collector (Linux: /proc/self/smaps_rollup).

    python benchmarks/data_pipeline.py [--samples 16] [--repeats 3]
"""
import argparse
import gc
import json
import os
import tempfile
import tracemalloc
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import cv2
import numpy as np
import torch
from mmengine import Config
from torchvision.transforms import v2

from mtvision.data.collate import COLLATE_FNS
from mtvision.data.datasets.index import SampleTable
from mtvision.data.prefetch import defer_normalization, to_device
from mtvision.registry import DATASETS
from common import ROOT, alternate_timings

RECIPE = ROOT / 'configs' / '_base_' / 'datasets' / 'real_4task_224px.py'
NORMALIZE = [dict(type='ToFloat'), dict(type='Normalize', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))]
# the MoCo v3 pipeline before: both views alike, always blurred by torchvision's kernel, jitter always applied
MOCO_BEFORE = [dict(type='MultiView', num_views=2, pipeline=[
    dict(type='RandomResizedCrop', size=224, scale=(0.08, 1.0), antialias=True), dict(type='RandomHorizontalFlip'),
    dict(type='ColorJitter', brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1),
    dict(type='RandomGrayscale', p=0.2), v2.GaussianBlur(kernel_size=23, sigma=(0.1, 2.0))] + NORMALIZE)]
INDEX_ENTRIES, INDEX_MEASURED = 1_281_167, 128_117


def _smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Photo-like content (smooth shapes plus grain), so JPEG and PNG decode at realistic cost."""
    coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    return np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)


def write_data(root: Path, samples: int) -> dict[str, str]:
    """The four formats under ``root``; the paths the recipe's datasets read, keyed by its config keys."""
    rng = np.random.default_rng(0)
    for folder in ('imagenet/n01440764', 'coco', 'ade/images', 'ade/labels', 'nyu/rgb', 'nyu/depth'):
        (root / folder).mkdir(parents=True)
    images, annotations = [], []
    for i in range(samples):
        cv2.imwrite(str(root / f'imagenet/n01440764/{i}.JPEG'), _smooth_image(rng, 375, 500),
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
        cv2.imwrite(str(root / f'coco/{i}.jpg'), _smooth_image(rng, 480, 640), [cv2.IMWRITE_JPEG_QUALITY, 90])
        images.append(dict(id=i + 1, file_name=f'{i}.jpg', height=480, width=640))
        for k in range(7):  # COCO's mean is about 7 objects per image
            x, y = rng.uniform(0, 500), rng.uniform(0, 380)
            annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, category_id=int(rng.integers(1, 81)),
                                    bbox=[x, y, rng.uniform(10, 140), rng.uniform(10, 100)], iscrowd=0, area=1.0))
        cv2.imwrite(str(root / f'ade/images/{i}.jpg'), _smooth_image(rng, 512, 683), [cv2.IMWRITE_JPEG_QUALITY, 90])
        labels = cv2.resize(rng.integers(0, 151, (16, 22), dtype=np.uint8), (683, 512),
                            interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(root / f'ade/labels/{i}.png'), labels)
        cv2.imwrite(str(root / f'nyu/rgb/{i}.png'), _smooth_image(rng, 480, 640))
        depth = cv2.resize(rng.integers(500, 10000, (15, 20)).astype(np.uint16), (640, 480))
        cv2.imwrite(str(root / f'nyu/depth/{i}.png'), depth)
    categories = [dict(id=c, name=str(c)) for c in range(1, 81)]
    (root / 'coco/ann.json').write_text(json.dumps(dict(images=images, annotations=annotations,
                                                        categories=categories)))
    return dict(imagenet=str(root / 'imagenet'), coco=str(root / 'coco'), ann=str(root / 'coco/ann.json'),
                ade_images=str(root / 'ade/images'), ade_labels=str(root / 'ade/labels'),
                nyu_rgb=str(root / 'nyu/rgb'), nyu_depth=str(root / 'nyu/depth'))


def task_datasets(paths: dict[str, str]) -> dict[str, tuple[str, dict, dict]]:
    """Per task pipeline of the recipe: (task type, dataset config before, dataset config after)."""
    recipe = Config.fromfile(str(RECIPE))
    located = dict(
        classification=(recipe._imagenet_task, dict(data_root=paths['imagenet'])),
        mae=(recipe._imagenet_mae_task, dict(data_root=paths['imagenet'])),
        mocov3=(recipe._imagenet_contrastive_task, dict(data_root=paths['imagenet'])),
        detection=(recipe._coco_task, dict(img_dir=paths['coco'], ann_file=paths['ann'])),
        segmentation=(recipe._ade20k_task, dict(img_dir=paths['ade_images'], ann_dir=paths['ade_labels'],
                                                img_suffix='.jpg')),
        depth=(recipe._nyuv2_task, dict(img_dir=paths['nyu_rgb'], depth_dir=paths['nyu_depth'])))
    datasets = {}
    for name, (task, where) in located.items():
        after = dict(task['train_dataset'].to_dict(), **where)
        before = dict(after, pipeline=MOCO_BEFORE) if name == 'mocov3' else after
        datasets[name] = (task['type'], before, after)
    return datasets


def worker_job(dataset, collate, samples: int):
    """What a DataLoader worker does for one batch: read, transform, collate, put in shared memory."""
    def run():
        batch = collate([dataset[i] for i in range(samples)])
        ForkingPickler.dumps(batch)  # moves the tensors into shared memory, as the worker's queue does
        return batch
    return run


def _worker_private_bytes(index) -> int:
    """Bytes a forked worker makes its own (Private_Dirty) by reading every 7th entry of ``index`` and one pass of
    the cyclic garbage collector: what copy-on-read costs per DataLoader worker."""
    def private_dirty() -> int:
        with open('/proc/self/smaps_rollup') as smaps:
            return next(int(line.split()[1]) * 1024 for line in smaps if line.startswith('Private_Dirty'))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        before = private_dirty()
        for i in range(0, len(index), 7):
            index[i]
        gc.collect()
        os.write(write, str(private_dirty() - before).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    return int(os.read(read, 64))


def index_costs() -> dict[str, tuple[float, float]]:
    """Per 1.28M-entry classification index, as a list of (Path, label) tuples and as a SampleTable: (bytes held,
    bytes each worker copies), measured on a tenth and scaled."""
    gc.collect()
    baseline = _worker_private_bytes([])  # the collector's pass over everything else the process holds
    names = [f'data/imagenet/train/n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG' for i in range(INDEX_MEASURED)]
    tracemalloc.start()
    rows = [(Path(name), i % 1000) for i, name in enumerate(names)]
    for path, _ in rows:
        str(path)  # a Path caches its string once read: what a dataset holds after its first epoch
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    costs = {'list of (Path, label)': (held, _worker_private_bytes(rows) - baseline)}
    table = SampleTable.from_rows(rows, width=2)
    del rows, names
    gc.collect()
    costs['SampleTable'] = (table.nbytes, _worker_private_bytes(table) - baseline)
    scale = INDEX_ENTRIES / INDEX_MEASURED
    return {name: (held * scale, max(copied, 0) * scale) for name, (held, copied) in costs.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--samples', type=int, default=16, help='samples per timed batch')
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker (limit_worker_threads)
    cv2.setNumThreads(1)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        datasets = task_datasets(write_data(Path(tmp), args.samples))
        for name, (task_type, before_cfg, after_cfg) in datasets.items():
            collate = COLLATE_FNS[task_type]
            before = DATASETS.build(before_cfg)
            after, normalization = defer_normalization(DATASETS.build(after_cfg))
            runs = {'before': worker_job(before, collate, args.samples),
                    'after': worker_job(after, collate, args.samples)}
            medians, _ = alternate_timings(runs, steps=1, repeats=args.repeats, warmup=1)
            host = runs['after']()
            batch_bytes = {key: run()['images'].nbytes for key, run in runs.items()}
            normalise, _ = alternate_timings({'n': lambda: to_device(host, torch.device('cpu'), normalization)},
                                             steps=1, repeats=args.repeats)
            rows.append((name, {key: args.samples / seconds for key, seconds in medians.items()}, batch_bytes,
                         normalise['n'] / args.samples))
    print(f'\n{"pipeline":<14} {"before img/s/core":>18} {"after img/s/core":>17} {"after/before":>13} '
          f'{"batch MB before":>16} {"after":>7} {"normalise ms/img (main process, CPU)":>37}')
    for name, rates, batch_bytes, normalise in rows:
        print(f'{name:<14} {rates["before"]:>18.1f} {rates["after"]:>17.1f} {rates["after"] / rates["before"]:>13.2f} '
              f'{batch_bytes["before"] / 1e6:>16.2f} {batch_bytes["after"] / 1e6:>7.2f} {1000 * normalise:>37.2f}')
    print(f'\n{"index of " + str(INDEX_ENTRIES) + " entries":<30} {"MB held":>8} {"MB copied per worker":>21}')
    index = index_costs()
    for name, (held, copied) in index.items():
        print(f'{name:<30} {held / 1e6:>8.0f} {copied / 1e6:>21.0f}')
    (list_held, list_copied), (table_held, table_copied) = index.values()
    ratios = ', '.join(f'{name} {rates["after"] / rates["before"]:.2f}x' for name, rates, _, _ in rows)
    print(f'\nsummary: images/s per CPU core after/before at 224 px: {ratios}; ImageNet index held '
          f'{list_held / 1e6:.0f} -> {table_held / 1e6:.0f} MB, copied per worker {list_copied / 1e6:.0f} -> '
          f'{table_copied / 1e6:.0f} MB; {args.samples} samples x {args.repeats} runs, 1 thread')


if __name__ == '__main__':
    main()
