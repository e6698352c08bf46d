#!/usr/bin/env bash
# The GPU check, on a machine with one CUDA device, in about 5 minutes (never more than GPU_CHECK_BUDGET_S, 440 s
# by default, plus the report). Parts, each under its own timeout; one failing does not stop the others:
#   environment   versions, the device, the synthetic data (generated under data/synthetic when missing)
#   cuda tests    the CUDA-only tests: fp16 grad scaler, bf16 vs fp32, device placement of every task's batch
#                 (tests/engine/test_cuda.py), exact resume with random draws on the device, the side-stream
#                 prefetch (tests/data/test_prefetch.py), collectives on the device of a CUDA-bound process group
#   throughput    ViT-B/16 at 224 px, batch 128, bf16: the mtvision Trainer vs a plain timm + torch loop, with
#                 data loading and on a fixed device batch (model only), MFU of each (benchmarks/train_step.py)
#   quick start   the 4-task quick start (tools/train.py), 240 iterations, under fp16 (grad scaler) and bf16:
#                 final metrics, s/iter, skipped steps
#   host syncs    device-to-host synchronisations per training step (benchmarks/host_syncs.py --device cuda)
#   moe           MoE ViT-S/16 (top-2 of 8 and 16 experts) vs the dense one, batched vs naive dispatch
#                 (benchmarks/moe.py --device cuda)
# It prints one table (part | result | key numbers) and a summary line, also written to LOG_DIR/summary.txt.
#
#     bash benchmarks/gpu_check.sh [LOG_DIR]      # each part's log goes to LOG_DIR (default gpu_check_logs/)
#     GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh /tmp/gpu_check_dry   # every part at a tiny size on the
#                                                 # CPU (the CUDA tests skip): checks the script and its table
#
# Expects mtvision's dependencies importable (installed, or on PYTHONPATH).
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${1:-gpu_check_logs}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
dry_run=${GPU_CHECK_DRY_RUN:-0}
budget=${GPU_CHECK_BUDGET_S:-$([[ $dry_run == 1 ]] && echo 1200 || echo 440)}
kill_after=10  # seconds between a timeout's SIGTERM (the trainer checkpoints and exits) and SIGKILL
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
parts="$work/parts.tsv"
: > "$parts"

# run_part NAME LOG TIMEOUT_S COMMAND...: COMMAND under `timeout`, its output appended to LOG_DIR/LOG; the
# timeout shrinks to what is left of the budget, and a part with under 20 s left is not started
run_part() {
    local name=$1 log="$logs/$2" limit=$3
    shift 3
    local left=$((budget - SECONDS - kill_after))
    ((limit > left)) && limit=$left
    if ((limit < 20)); then
        echo "== $name: not run, ${left} s of the ${budget} s budget left" | tee -a "$log"
        printf '%s\t%s\t%s\t%s\t%s\n' "$name" budget 0 0 "$log" >> "$parts"
        return
    fi
    echo "== $name (timeout ${limit} s): $*" | tee -a "$log"
    local start=$SECONDS
    timeout -k "$kill_after" "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    echo "== $name: exit status $rc after $((SECONDS - start)) s" | tee -a "$log"
    grep -E '^summary:| in [0-9.]+s\b' "$log" | tail -2
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" "$log" >> "$parts"
}

if [[ $dry_run == 1 ]]; then
    device=cpu
    throughput=(--preset quickstart --batch-size 8 --num-workers 0 --steps 2 --warmup 1 --repeats 1 --peak-tflops 1)
    quickstart=(train_cfg.max_iters=4 train_cfg.val_interval=4 param_scheduler.0.end=1 param_scheduler.1.begin=1
                param_scheduler.1.end=4 log_cfg.interval=2 model.backbone.embed_dim=32 model.backbone.depth=2
                model.backbone.num_heads=2 tasks.cls.batch_size=2 tasks.det.batch_size=2 tasks.seg.batch_size=2
                tasks.depth.batch_size=2)
    host_syncs=(--steps 2 --warmup 1 --batch-size 2)
    moe=(--quick)
else
    device=cuda
    throughput=(--preset vit-b16 --batch-size 128 --num-workers 12 --steps 20 --warmup 5 --repeats 3)
    # the quick start shortened to 240 of its 600 iterations, its schedule (warm-up, cosine) scaled alike; data
    # loaded by 3 workers a task
    quickstart=(train_cfg.max_iters=240 train_cfg.val_interval=240 param_scheduler.0.end=20
                param_scheduler.1.begin=20 param_scheduler.1.end=240 log_cfg.interval=20
                tasks.cls.num_workers=3 tasks.det.num_workers=3 tasks.seg.num_workers=3 tasks.depth.num_workers=3)
    host_syncs=()
    moe=(--embed-dim 384 --depth 12 --img-size 224 --patch-size 16 --batch-size 64 --experts 8 16 --steps 5
         --warmup 2 --repeats 3)
fi

environment() {
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    fi
    python3 - "$device" <<'EOF' || return 1
import sys, timm, torch, torchvision
cuda = torch.cuda.is_available()
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'torchvision', torchvision.__version__, 'timm',
      timm.__version__, '| device:', torch.cuda.get_device_name() if cuda else 'cpu', '|', torch.get_num_threads(),
      'threads')
sys.exit(sys.argv[1] == 'cuda' and not cuda)  # a GPU check without a GPU fails here, visibly
EOF
    python3 -c "from mtvision.data.synthetic import ensure_synthetic; ensure_synthetic('data/synthetic')"
}

resume_test=test_resume_on_cuda_reproduces_the_uninterrupted_run_with_random_draws_on_the_device
collectives_test=test_every_collective_of_a_training_step_runs_on_the_device_its_process_group_serves
cuda_tests=(tests/engine/test_cuda.py "tests/engine/test_trainer.py::$resume_test"
            "tests/engine/test_distributed_training.py::$collectives_test[cuda:gloo]"
            tests/data/test_prefetch.py::test_side_stream_prefetch_gives_the_synchronous_values)

export -f environment
export device
run_part environment environment.log 90 bash -c environment
run_part 'cuda tests' cuda_tests.log 120 python3 -m pytest "${cuda_tests[@]}" -q -rfEs --tb=short -p no:cacheprovider
run_part 'throughput bf16' throughput_vit-b16_bf16.log 120 python3 benchmarks/train_step.py --amp bf16 \
    "${throughput[@]}"
for amp in fp16 bf16; do
    run_part "quick start $amp" "quickstart_$amp.log" 90 python3 tools/train.py \
        configs/quickstart/vit-tiny-p8_4task_synthetic.py --amp-dtype "$amp" --work-dir "$work/quickstart_$amp" \
        --cfg-options train_cfg.val_at_start=False log_cfg.visualize=False log_cfg.tensorboard=False \
        checkpoint_cfg.interval=1000000 "${quickstart[@]}"
done
run_part 'host syncs' host_syncs.log 120 python3 benchmarks/host_syncs.py --device "$device" \
    ${host_syncs[@]+"${host_syncs[@]}"}
run_part moe moe.log 60 python3 benchmarks/moe.py --device "$device" "${moe[@]}"

# the table: each part's result and key numbers, read from its log (and the quick starts' work dirs)
python3 - "$parts" "$work" "$dry_run" "$budget" <<'EOF' | tee "$logs/summary.txt"
import json
import re
import statistics
import sys
from pathlib import Path

parts_file, work, dry_run, budget = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == '1', sys.argv[4]


def summary_line(text: str) -> str:
    return next((line for line in reversed(text.splitlines()) if line.startswith('summary:')), '')


def environment(text, numbers):
    versions = next((line for line in text.splitlines() if line.startswith('torch ')), '')
    return versions.replace(' | ', '; ')


def cuda_tests(text, numbers):
    final = next(line for line in reversed(text.splitlines()) if re.search(r'\b(passed|failed|skipped|errors?|no '
                                                                           r'tests ran)\b.* in [\d.]+s', line))
    counts = {kind: int(n) for n, kind in re.findall(r'(\d+) (passed|failed|skipped|errors?|deselected)', final)}
    numbers['tests'] = counts
    failed = re.findall(r'^(?:FAILED|ERROR) (\S+)', text, re.M)
    return ', '.join(f'{n} {kind}' for kind, n in counts.items()) + (f'; failed: {", ".join(failed)}' if failed
                                                                       else '')


def throughput(text, numbers):
    line = summary_line(text)
    ratio, model_ratio = re.search(r'ratio = ([\d.]+) .*model only ([\d.]+)', line).groups()
    rates = re.search(r'images/s: plain (\d+), mtvision (\d+), model only plain (\d+), mtvision (\d+)', line).groups()
    mfu = re.search(r'MFU: plain ([^,\s]+), mtvision ([^,\s]+), model only plain ([^,\s]+), mtvision ([^,\s]+)',
                    line).groups()
    numbers['throughput'] = dict(ratio=float(ratio), mfu_plain=mfu[0], mfu_mtvision=mfu[1])
    return (f'trainer/plain {ratio} (fixed batch {model_ratio}); img/s trainer {rates[1]} vs plain {rates[0]} '
            f'(fixed batch {rates[3]} vs {rates[2]}); MFU trainer {mfu[1]} vs plain {mfu[0]} (fixed batch '
            f'{mfu[3]} vs {mfu[2]})')


def quick_start(amp):
    def read(text, numbers):
        work_dir = work / f'quickstart_{amp}'
        from mtvision.engine.logging import latest_run_dir
        records = [json.loads(line) for line in (latest_run_dir(work_dir) / 'scalars.jsonl').read_text().splitlines()]
        train = [record for record in records if 'time' in record]
        times = [record['time'] for record in train[1:] or train]  # the first interval holds the warm-up
        s_per_iter = statistics.mean(times)
        numbers[f'quickstart_{amp}'] = s_per_iter
        found = [f'{s_per_iter:.3f} s/it (data {statistics.mean(r["data_time"] for r in train[1:] or train):.3f})',
                 f'{train[-1]["step"]} it', f'skipped {train[-1].get("skipped_steps", "?")}']
        if 'amp/loss_scale' in train[-1]:
            found.append(f'loss scale {train[-1]["amp/loss_scale"]:g}')
        metrics_file = work_dir / 'metrics.json'
        if metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text())['metrics']
            found.append(', '.join(f'{task} {name} {value:.3g}' for task, values in metrics.items()
                                   for name, value in list(values.items())[:1]))
        else:
            found.append('no metrics.json (no final evaluation)')
        return '; '.join(found)
    return read


def host_syncs(text, numbers):
    runs = re.findall(r'^== (.+?): host syncs per step: (\S+)', text, re.M)
    if not runs:
        raw = [line.strip() for line in text.splitlines() if 'host sync' in line.lower()]
        return 'unparsed: ' + (' | '.join(raw[-4:]) or 'no host-sync lines')
    numbers['host_syncs'] = f'{runs[0][1]} ({runs[0][0]})'
    return '; '.join(f'{name} {value}' for name, value in runs)


def moe(text, numbers):
    line = summary_line(text)
    ratios = re.search(r'MoE/dense step time (.+?) \(goal', line).group(1)
    speedups = re.search(r'model step ([\d.]+x), MoE layer ([\d.]+x)', line).groups()
    numbers['moe'] = ratios.split(',')[0].split()[-1] + f' ({ratios.split(",")[0].split()[0]})'
    return f'MoE/dense {ratios}; batched/naive dispatch: step {speedups[0]}, layer {speedups[1]}'


readers = {'environment': environment, 'cuda tests': cuda_tests, 'throughput bf16': throughput,
           'quick start fp16': quick_start('fp16'), 'quick start bf16': quick_start('bf16'),
           'host syncs': host_syncs, 'moe': moe}
rows, numbers, passed = [], {}, 0
for line in parts_file.read_text().splitlines():
    name, rc, seconds, limit, log = line.split('\t')
    text = Path(log).read_text(errors='replace') if Path(log).is_file() else ''
    if rc == 'budget':
        result = 'not run (time budget)'
    elif rc in ('124', '137'):
        result = f'TIMEOUT ({limit} s)'
    elif rc != '0':
        result = f'FAIL (exit {rc})'
    else:
        result = 'ok'
    try:
        details = readers[name](text, numbers) if rc != 'budget' else ''
    except Exception as error:  # the numbers are missing or malformed: say so, keep the other rows
        details = f'unreadable ({type(error).__name__}: {error}); see {log}'
        if result == 'ok':
            result = 'FAIL (no numbers)'
    if name == 'cuda tests' and result == 'ok' and numbers.get('tests', {}).get('skipped') and not dry_run:
        result = 'FAIL (tests skipped)'
    if name.startswith('quick start') and result == 'ok' and 'no metrics.json' in details:
        result = 'FAIL (no final metrics)'
    passed += result == 'ok'
    rows.append((name, f'{result}, {seconds} s' if rc != 'budget' else result, details))

title = 'gpu_check' + (' (dry run on the CPU at tiny sizes)' if dry_run else '')
print(f'\n{title}\n')
print(f'| {"part":<16} | {"result":<24} | key numbers')
print(f'|{"-" * 18}|{"-" * 26}|{"-" * 60}')
for name, result, details in rows:
    print(f'| {name:<16} | {result:<24} | {details}')
throughput_numbers = numbers.get('throughput')
print(f'\ngpu_check: {passed}/{len(rows)} parts passed; ViT-B/16 bf16 trainer/plain = '
      + (f'{throughput_numbers["ratio"]:.2f} (MFU {throughput_numbers["mfu_mtvision"]} vs '
         f'{throughput_numbers["mfu_plain"]})' if throughput_numbers else 'n/a')
      + '; quick start ' + ', '.join(f'{amp} ' + (f'{numbers[key]:.3f} s/it' if key in numbers else 'n/a')
                                     for amp, key in (('fp16', 'quickstart_fp16'), ('bf16', 'quickstart_bf16')))
      + f'; host syncs per step: {numbers.get("host_syncs", "n/a")}; MoE/dense = {numbers.get("moe", "n/a")}')
EOF
