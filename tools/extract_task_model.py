"""Extract one task's model from a trained mixture-of-experts model: keep the experts the task routes to.

    python tools/extract_task_model.py CHECKPOINT --task TASK --out DIR [--threshold 0.0] [--batches 10]
                                       [--finetune ITERS]

The task's expert usage is measured on its validation set (``--split train`` for the training set), an expert is
kept when its share of the task's token assignments is above ``--threshold`` (0 keeps every expert the task used,
so the outputs on the task are the full model's), and ``DIR/<task>.py`` plus ``DIR/iter_<N>/`` are written:
``python tools/test.py DIR/<task>.py DIR`` evaluates the extracted model.

What pruning costs is reported: the task's metrics on its validation set for the full and the extracted model, and
the share of its predictions that changed (classes, pixel labels, depths off by more than 1%). A threshold that
drops experts the task still uses changes predictions; fine-tuning the extracted model for a few hundred
iterations recovers most of it, as Mod-Squad prunes, then tunes.

``--finetune ITERS`` runs that fine-tune here, on the task's training data alone, from the extracted weights (which
stay as written) into ``DIR/finetune/`` (its ``iter_<ITERS>/`` checkpoint, config and logs, as ``tools/train.py``
leaves a work dir), and reports the metrics full -> extracted -> fine-tuned and the share of the fine-tuned model's
predictions that differ from the full model's. It is the extracted config's own recipe, shortened: the same
optimizer and learning rate (a short fine-tune of a model that was trained with it; ``auto_scale_lr`` applies as in
training), a linear warm-up of ``min(ITERS // 10, the config's warm-up)`` iterations, then the config's decay
(cosine) compressed into the remaining iterations; no evaluation during it. Longer or otherwise changed runs:
``python tools/train.py DIR/<task>.py --load-from DIR/iter_<N> --cfg-options ...``.
"""
import argparse


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Extract one task's smaller model from a trained MoE model")
    parser.add_argument('checkpoint', help='checkpoint directory or work dir (its training state holds the config)')
    parser.add_argument('--task', required=True, help='the task to keep')
    parser.add_argument('--out', required=True, help='output directory')
    parser.add_argument('--threshold', type=float, default=0.0,
                        help="keep experts whose share of the task's assignments is above this (default 0: all used)")
    parser.add_argument('--batches', type=int, default=10, help='batches to measure the expert usage on')
    parser.add_argument('--split', choices=['val', 'train'], default='val', help='data to measure the usage on')
    parser.add_argument('--finetune', type=int, default=0, metavar='ITERS',
                        help='then fine-tune the extracted model for ITERS iterations into DIR/finetune/ (default 0: '
                             'none)')
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.finetune < 0:
        raise SystemExit(f'--finetune takes a number of iterations (0: none), got {args.finetune}')
    import itertools
    from pathlib import Path

    from mtvision.checkpoint import load_training_state, load_weights, read_stored_config
    from mtvision.engine.evaluator import evaluate, metric_unit, val_loader
    from mtvision.engine.extraction import (changed_predictions, extract_task_model, finetune_task_model,
                                            measure_expert_usage, save_task_model)
    from mtvision.engine.logging import setup_logging
    from mtvision.models import build_model
    from mtvision.tasks import build_tasks
    from mtvision.zoo import training_checkpoint

    setup_logging()
    checkpoint = training_checkpoint(args.checkpoint, 'extract a task model from')
    state = load_training_state(checkpoint)
    cfg = read_stored_config(checkpoint)  # data, checked for building: a checkpoint may come from anyone
    if args.task not in cfg.tasks:
        raise SystemExit(f'unknown task {args.task!r}; the checkpoint has {list(cfg.tasks)}')
    tasks = build_tasks(cfg.tasks, train=False, val=False)
    model = build_model(cfg, tasks)
    load_weights(model, checkpoint)
    task = build_tasks({args.task: cfg.tasks[args.task]}, train=args.split == 'train', val=args.split == 'val')[
        args.task]
    if args.split == 'train':  # same batching as validation: fixed order, the validation batch size
        task.val_dataset = task.train_dataset
    if task.val_dataset is None:
        raise SystemExit(f'task {args.task!r} has no {args.split} dataset to measure its expert usage on')
    usage = measure_expert_usage(model, args.task, itertools.islice(val_loader(task), args.batches))
    extracted, extracted_cfg = extract_task_model(model, cfg, args.task, usage, args.threshold)
    save_task_model(extracted, extracted_cfg, args.out, step=state['step'])
    before, after = (sum(p.numel() for p in m.parameters()) for m in (model, extracted))
    kept = extracted_cfg.model.backbone.moe.num_experts
    print(f'{args.task}: kept experts per MoE block {list(kept)} of {cfg.model.backbone.moe.num_experts}; '
          f'parameters {before / 1e6:.2f} M -> {after / 1e6:.2f} M')
    summary = dict(kept=list(kept), parameters_before=before, parameters_after=after)
    models = {'full': model, 'extracted': extracted}
    if args.finetune:
        finetune_dir = Path(args.out) / 'finetune'
        finetuned = finetune_task_model(extracted_cfg, Path(args.out) / f'iter_{state["step"]}', finetune_dir,
                                        args.finetune)
        models['finetuned'] = finetuned.to(next(model.parameters()).device)  # evaluated beside the full model
        print(f'{args.task}: fine-tuned for {args.finetune} iterations into {finetune_dir}')
    if cfg.tasks[args.task].get('val_dataset'):  # what pruning costs, on the validation set
        # the usage was measured on the validation set already: its dataset is built once
        val_task = task if args.split == 'val' else build_tasks({args.task: cfg.tasks[args.task]}, train=False)[
            args.task]
        metrics, changed = {}, {}
        for name, compared in models.items():
            compared.eval()
            metrics[name] = evaluate(compared, {args.task: val_task}, shard=False)[args.task]
            if name != 'full':
                changed[name] = changed_predictions(model, compared, args.task, val_task.type,
                                                    val_loader(val_task, shard=False))
        columns = {'full': 'full', 'extracted': 'extracted', 'finetuned': 'fine-tuned'}
        print(f'{args.task} on its validation set, {" -> ".join(columns[name] for name in models)}:\n' + '\n'.join(
            f'  {key} {" -> ".join(f"{metrics[name][key]:.4g}" for name in models)} {metric_unit(key)}'.rstrip()
            for key in metrics['full']))
        if changed['extracted'] is not None:
            shares = ', '.join(f'{columns[name]} {100 * share:.2f}%' for name, share in changed.items())
            recover = (f'; to recover, fine-tune: --finetune ITERS, or python tools/train.py {args.out}/{args.task}.py '
                       f'--load-from {args.out}/iter_{state["step"]}')
            print(f'  predictions changed from the full model\'s: {shares}'
                  + (recover if changed['extracted'] and not args.finetune else ''))
        summary.update(metrics_full=metrics['full'], metrics_extracted=metrics['extracted'],
                       changed=changed['extracted'])
        if args.finetune:
            summary.update(metrics_finetuned=metrics['finetuned'], changed_finetuned=changed['finetuned'])
    return summary


if __name__ == '__main__':
    main()
