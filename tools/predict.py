"""Predict every task of a model on image files and print a summary per image (optionally write them as JSON).

    python tools/predict.py MODEL IMAGE [IMAGE ...] [--task T ...] [--out FILE.json] [--device D] [--config CFG]

MODEL is a zoo name (``mtvision.list_models()``), a work dir, a checkpoint directory, or a weights file with
``--config`` (the training config it comes from): anything ``mtvision.zoo.load_model`` accepts. Predictions are in
each image's own frame (``mtvision.inference.predict``).

``--out FILE.json`` writes, per image, its path and predictions, each task's as its type writes it
(``TaskType.to_json``): classification, multi-label classification and detection in the JSON itself (boxes XYXY
in image pixels, every detection the head kept, with its score); segmentation masks as PNG files of class ids
(8-bit, 16-bit past 255 classes), depth maps as 16-bit PNG files of millimetres (NYUv2's format; 0 = no depth) and
normals as RGB PNGs in the datasets' encoding, beside the JSON and named by it
(``FILE-<image index>-<image stem>-<task>.png``); the tensors of other task types (named with ``--task``) as
``.npy`` files named the same way.
"""
import argparse
import json
from pathlib import Path


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


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    import torch

    from mtvision.inference import predict
    from mtvision.task_types import task_type_spec
    from mtvision.zoo import load_model

    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    model = load_model(args.model, config=args.config)
    predictions = predict(model, args.images, args.tasks, batch_size=args.batch_size, device=device)
    specs = {task: task_type_spec(model.cfg.tasks[task]['type']) for task in model.heads}  # how each type reads
    records = []
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    for index, (image, per_task) in enumerate(zip(args.images, predictions)):
        classes = {task: model.data_config[task].get('classes') for task in per_task}
        print(image)
        for task, prediction in per_task.items():
            print(f'  {task}: {specs[task].summarize(prediction, classes[task], args.score_thr)}')
        if args.out is not None:
            stem = args.out.parent / f'{args.out.stem}-{index}-{Path(image).stem}'
            records.append(dict(image=str(image), predictions={
                task: specs[task].to_json(prediction, classes[task], stem.parent / f'{stem.name}-{task}')
                for task, prediction in per_task.items()}))
    if args.out is not None:
        # one line per image: readable, where an indented list of a hundred boxes would fill pages
        lines = ',\n'.join(json.dumps(record) for record in records)
        args.out.write_text(f'{{"model": {json.dumps(args.model)}, "images": [\n{lines}\n]}}\n')
        print(f'wrote {args.out}')
    return predictions


if __name__ == '__main__':
    main()
