"""Predict every task of a model on image files and print a summary per image (optionally write them as JSON).

    python tools/predict.py MODEL IMAGE [IMAGE ...] [--task T ...] [--out FILE.json] [--device D] [--config CFG]

MODEL is a zoo name (``mtvision.list_models()``), a work dir, a checkpoint directory, or a weights file with
``--config`` (the training config it comes from): anything ``mtvision.zoo.load_model`` accepts. Predictions are in
each image's own frame (``mtvision.inference.predict``).

``--out FILE.json`` writes, per image, its path and predictions: classification and detection in the JSON
itself (boxes XYXY in image pixels, every detection the head kept, with its score); segmentation masks as PNG
files of class ids (8-bit, 16-bit past 255 classes) and depth maps as 16-bit PNG files of millimetres (NYUv2's
format; 0 = no depth), beside the JSON and named by it (``FILE-<image index>-<image stem>-<task>.png``); the tensors
of other task types (named with ``--task``) as ``.npy`` files named the same way.
"""
import argparse
import json
from pathlib import Path

import numpy as np

BEST_DETECTIONS = 3  # detections shown per image in the summary


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Each task's predictions for image files")
    parser.add_argument('model', help='a zoo model name, work dir, checkpoint directory or weights file')
    parser.add_argument('images', nargs='+', help='image files')
    parser.add_argument('--config', help="the model's config file, for a weights file (which holds none)")
    parser.add_argument('--task', nargs='+', dest='tasks', metavar='TASK',
                        help='tasks to predict (default: every classification, detection, segmentation and depth '
                             'task)')
    parser.add_argument('--out', type=Path, help='write the predictions to this JSON file (maps beside it)')
    parser.add_argument('--device', help="where to run, e.g. 'cuda' or 'cpu' (default: cuda when available)")
    parser.add_argument('--batch-size', type=int, default=8, help='images per forward (default 8)')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detections counted in the summary score at least this (default 0.3)')
    return parser.parse_args(argv)


def _named(class_id: int, name: str | None) -> str:
    return name if name is not None else f'class {class_id}'


def summary(task: str, task_type: str, prediction, classes, score_thr: float) -> str:
    """One line on ``task``'s prediction for one image."""
    if task_type == 'classification':
        return f'{task}: {_named(prediction["class_id"], prediction["class_name"])} ({prediction["score"]:.3f})'
    if task_type == 'detection':
        kept = (prediction['scores'] >= score_thr).nonzero().flatten().tolist()  # the head sorts by score
        names = prediction['label_names'] or [None] * len(prediction['labels'])
        best = ', '.join(f'{_named(int(prediction["labels"][i]), names[i])} {float(prediction["scores"][i]):.2f} '
                         f'[{", ".join(f"{v:.0f}" for v in prediction["boxes"][i].tolist())}]'
                         for i in kept[:BEST_DETECTIONS])
        return f'{task}: {len(kept)} detections with score >= {score_thr:g}' + (f'; best: {best}' if best else '')
    if task_type == 'segmentation':
        ids, counts = prediction.unique(return_counts=True)
        shares = sorted(zip(counts.tolist(), ids.tolist()), reverse=True)
        return f'{task}: ' + ', '.join(
            f'{_named(i, None if classes is None else classes[i])} {100 * c / prediction.numel():.1f}%'
            for c, i in shares)
    if task_type == 'depth':
        return f'{task}: min {prediction.min():.2f} m, median {prediction.median():.2f} m, max {prediction.max():.2f} m'
    return f'{task}: {task_type} output'


def _write_png(path: Path, array: np.ndarray) -> str:
    import cv2
    if not cv2.imwrite(str(path), array):
        raise OSError(f'cannot write {path}')
    return path.name


def to_json(prediction, task_type: str, classes, stem: Path):
    """``prediction`` as JSON data; maps written to files named ``<stem>.png`` / ``<stem>-<key>.npy``."""
    if task_type == 'classification':
        return prediction
    if task_type == 'detection':
        return {key: value.tolist() if hasattr(value, 'tolist') else value for key, value in prediction.items()}
    if task_type == 'segmentation':
        ids = prediction.numpy()
        dtype = np.uint8 if ids.max(initial=0) < 256 else np.uint16
        return dict(mask=_write_png(stem.with_suffix('.png'), ids.astype(dtype)), classes=classes)
    if task_type == 'depth':
        millimetres = np.clip(np.rint(prediction.numpy() * 1000), 0, np.iinfo(np.uint16).max).astype(np.uint16)
        return dict(depth_png=_write_png(stem.with_suffix('.png'), millimetres), depth_scale=1000)
    items = prediction.items() if isinstance(prediction, dict) else [('output', prediction)]
    files = {}
    for key, value in items:
        path = stem.parent / f'{stem.name}-{key}.npy'
        np.save(path, np.asarray(value))
        files[key] = path.name
    return files


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    import torch

    from mtvision.inference import predict
    from mtvision.zoo import load_model

    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    model = load_model(args.model, config=args.config)
    predictions = predict(model, args.images, args.tasks, batch_size=args.batch_size, device=device)
    types = {task: model.cfg.tasks[task]['type'] for task in model.heads}
    records = []
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    for index, (image, per_task) in enumerate(zip(args.images, predictions)):
        classes = {task: model.data_config[task].get('classes') for task in per_task}
        print(image)
        for task, prediction in per_task.items():
            print('  ' + summary(task, types[task], prediction, classes[task], args.score_thr))
        if args.out is not None:
            stem = args.out.parent / f'{args.out.stem}-{index}-{Path(image).stem}'
            records.append(dict(image=str(image), predictions={
                task: to_json(prediction, types[task], classes[task], stem.parent / f'{stem.name}-{task}')
                for task, prediction in per_task.items()}))
    if args.out is not None:
        # one line per image: readable, where an indented list of a hundred boxes would fill pages
        lines = ',\n'.join(json.dumps(record) for record in records)
        args.out.write_text(f'{{"model": {json.dumps(args.model)}, "images": [\n{lines}\n]}}\n')
        print(f'wrote {args.out}')
    return predictions


if __name__ == '__main__':
    main()
