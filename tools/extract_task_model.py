"""Extract one task's model from a trained mixture-of-experts model: keep the experts the task routes to.

    python tools/extract_task_model.py CHECKPOINT --task TASK --out DIR [--threshold 0.0] [--batches 10]

The task's expert usage is measured on its validation set (``--split train`` for the training set), an expert is
kept when its share of the task's token assignments is above ``--threshold`` (0 keeps every expert the task used,
so the outputs on the task are the full model's), and ``DIR/<task>.py`` plus ``DIR/iter_<N>/`` are written:
``python tools/test.py DIR/<task>.py DIR`` evaluates the extracted model.

What pruning costs is reported: the task's metrics on its validation set for the full and the extracted model, and
the share of its predictions that changed (classes, pixel labels, depths off by more than 1%). A threshold that
drops experts the task still uses changes predictions; fine-tuning the extracted model for a few hundred
iterations (``tools/train.py DIR/<task>.py --load-from DIR``) recovers most of it, as Mod-Squad prunes, then tunes.
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
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import itertools

    from mtvision.engine import build_model, load_training_state, load_weights
    from mtvision.engine.checkpoint import read_stored_config, resolve_checkpoint
    from mtvision.engine.evaluator import evaluate, metric_unit, val_loader
    from mtvision.engine.extraction import (changed_predictions, extract_task_model, measure_expert_usage,
                                            save_task_model)
    from mtvision.engine.logging import setup_logging
    from mtvision.tasks import build_tasks

    setup_logging()
    checkpoint = resolve_checkpoint(args.checkpoint)
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
    if cfg.tasks[args.task].get('val_dataset'):  # what pruning costs, on the validation set
        # the usage was measured on the validation set already: its dataset is built once
        val_task = task if args.split == 'val' else build_tasks({args.task: cfg.tasks[args.task]}, train=False)[
            args.task]
        model.eval()
        extracted.eval()
        metrics = {name: evaluate(m, {args.task: val_task}, shard=False)[args.task]
                   for name, m in (('full', model), ('extracted', extracted))}
        changed = changed_predictions(model, extracted, args.task, val_task.type, val_loader(val_task, shard=False))
        print(f'{args.task} on its validation set, full -> extracted:\n' + '\n'.join(
            f'  {key} {metrics["full"][key]:.4g} -> {metrics["extracted"][key]:.4g} {metric_unit(key)}'.rstrip()
            for key in metrics['full']))
        if changed is not None:
            recover = f'; to recover, fine-tune: python tools/train.py {args.out}/{args.task}.py --load-from {args.out}'
            print(f'  predictions changed: {100 * changed:.2f}%' + (recover if changed else ''))
        summary.update(metrics_full=metrics['full'], metrics_extracted=metrics['extracted'], changed=changed)
    return summary


if __name__ == '__main__':
    main()
