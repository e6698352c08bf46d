"""Step time of a ViT with mixture-of-experts MLPs vs the dense ViT, and batched vs naive expert dispatch.

One step is the forward and backward of a timm ViT on a batch (the loss is the sum of its final tokens, plus the
MoE auxiliary losses). Models: the dense ViT; the same ViT with every other block's MLP (blocks 1, 3, ...)
replaced by a top-2 :class:`~mtvision.models.moe.MoEMlp` of E experts (upcycled, expert hidden width = dense
hidden width, no capacity limit) for each ``--experts``; and the largest-E MoE ViT again with the naive expert loop
(``naive_forward``) in place of the batched dispatch. Runs alternate between models so drift in machine load hits
all of them; each reported time is the median over ``--repeats`` runs of the mean of ``--steps`` steps.

FLOPs per image are forward FLOPs. ``counted`` is what ``torch.utils.flop_counter.FlopCounterMode`` counts (matrix
products only; for the MoE this includes the padding rows of the ``[E, C, dim]`` expert buffer); ``active`` is
analytic: the dense count with each MoE block's MLP counted ``top_k`` times plus its router. With top-2 experts in
half the blocks the MLP work of those blocks doubles, so the ideal MoE/dense ratio is about 1.33 when the MLP is
two thirds of a block's FLOPs (few tokens). Goals: MoE/dense step time <= 1.3; batched/naive speed-up >= 1.5 at
E = 16.

    python benchmarks/moe.py [--embed-dim 192] [--depth 6] [--img-size 64] [--patch-size 8] [--batch-size 32]
                             [--experts 8 16] [--steps 5] [--repeats 5] [--device cpu] [--quick]
"""
import argparse
from collections.abc import Callable

import timm
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from mtvision.models.moe import auxiliary_losses, convert_to_moe, moe_layers
from common import alternate_timings, synchronized

TASK = 'task'


def build(args: argparse.Namespace, num_experts: int | None, naive: bool = False) -> nn.Module:
    torch.manual_seed(0)  # every model starts from the same dense weights
    model = timm.create_model('vit_tiny_patch16_224', img_size=args.img_size, patch_size=args.patch_size,
                              embed_dim=args.embed_dim, depth=args.depth, num_heads=max(1, args.embed_dim // 64),
                              num_classes=0)
    if num_experts is not None:
        convert_to_moe(model.blocks, range(1, args.depth, 2), num_experts, [TASK], top_k=args.top_k,
                       hidden_dim=args.expert_hidden, upcycle=args.expert_hidden is None,
                       capacity_factor=args.capacity_factor)
        for _, layer in moe_layers(model):
            layer.task = TASK
            if naive:
                layer.forward = layer.naive_forward  # this instance only
    return model


def train_step(model: nn.Module, images: Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss = model.forward_features(images).sum()
        loss = loss + sum(auxiliary_losses(model).values())
        loss.backward()
    return synchronized(step, images.device)


def counted_flops(model: nn.Module, images: Tensor) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.forward_features(images)
    return counter.get_total_flops() / images.shape[0]


def active_flops(dense_flops: float, model: nn.Module, tokens_per_image: int, dense_hidden: int) -> float:
    """Dense forward FLOPs per image with each MoE block's dense MLP replaced by ``top_k`` experts of their hidden
    width, plus the router (2 FLOPs per multiply-add, as FlopCounterMode counts)."""
    flops = dense_flops
    for _, layer in moe_layers(model):
        dense_mlp = 2 * 2 * layer.dim * dense_hidden  # fc1 + fc2
        expert_mlp = 2 * 2 * layer.dim * layer.hidden_dim
        flops += tokens_per_image * (layer.top_k * expert_mlp - dense_mlp + 2 * layer.dim * layer.num_experts)
    return flops


def parameters(model: nn.Module) -> tuple[int, int]:
    """Total parameters, and those one token uses (``top_k`` of each MoE layer's experts)."""
    total = sum(p.numel() for p in model.parameters())
    active = total
    for _, layer in moe_layers(model):
        per_expert = sum(p[0].numel() for p in (layer.w1, layer.b1, layer.w2, layer.b2))
        active -= (layer.num_experts - layer.top_k) * per_expert
    return total, active


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--embed-dim', type=int, default=192)
    parser.add_argument('--depth', type=int, default=6)
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('--patch-size', type=int, default=8)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--experts', type=int, nargs='+', default=[8, 16], help='MoE sizes; the largest also naive')
    parser.add_argument('--top-k', type=int, default=2)
    parser.add_argument('--capacity-factor', type=float, default=None,
                        help='expert capacity (GShard); default: none, every assignment kept')
    parser.add_argument('--expert-hidden', type=int,
                        help='hidden width of each expert (default: the dense MLP\'s, 4 x width); width * 4 / top_k '
                             'matches the dense model\'s active FLOPs')
    parser.add_argument('--steps', type=int, default=5, help='timed steps per run')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, help='torch threads (default: torch decides)')
    parser.add_argument('--device', default='cpu', help='where the models run (cpu, cuda)')
    parser.add_argument('--quick', action='store_true', help='tiny smoke configuration (width 32, depth 2, 32 px)')
    args = parser.parse_args()
    if args.quick:
        args.embed_dim, args.depth, args.img_size, args.batch_size = 32, 2, 32, 4
        args.steps, args.warmup, args.repeats = 2, 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.depth < 2:
        parser.error(f'--depth {args.depth}: need at least 2 blocks to put MoE in every other one')

    device = torch.device(args.device)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size,
                         generator=torch.Generator().manual_seed(0)).to(device)
    largest = max(args.experts)
    models = {'dense': build(args, None)}
    models.update({f'moe E={e}': build(args, e) for e in sorted(args.experts)})
    models[f'moe E={largest} naive'] = build(args, largest, naive=True)
    models = {name: model.to(device) for name, model in models.items()}

    tokens_per_image = (args.img_size // args.patch_size) ** 2 + models['dense'].num_prefix_tokens
    dense_flops = counted_flops(models['dense'], images)
    info = {}
    for name, model in models.items():
        total, active = parameters(model)
        info[name] = dict(params=total, active_params=active, counted=counted_flops(model, images),
                          active=active_flops(dense_flops, model, tokens_per_image, 4 * args.embed_dim))

    steps = {name: train_step(model, images) for name, model in models.items()}
    medians, times = alternate_timings(steps, args.steps, args.repeats, args.warmup)

    # the MoE layer alone, batched vs naive, on one MoE block's input size
    layer = next(layer for _, layer in moe_layers(models[f'moe E={largest}']))
    x = torch.randn(args.batch_size * tokens_per_image, args.embed_dim,
                    generator=torch.Generator().manual_seed(1)).to(device)
    layer_steps = {'batched': synchronized(lambda: layer(x).sum().backward(), device),
                   'naive': synchronized(lambda: layer.naive_forward(x).sum().backward(), device)}
    layer_medians, _ = alternate_timings(layer_steps, args.steps, args.repeats, args.warmup)

    print(f'\nViT width {args.embed_dim}, depth {args.depth}, {args.img_size}px, patch {args.patch_size}, batch '
          f'{args.batch_size} ({tokens_per_image} tokens/image); MoE top-{args.top_k}, expert hidden '
          f'{args.expert_hidden or 4 * args.embed_dim}, in blocks '
          f'{list(range(1, args.depth, 2))}')
    print(f'{"model":<18} {"params M":>9} {"active M":>9} {"GFLOPs/img counted":>19} {"active":>8} '
          f'{"ms/step":>9} {"vs dense":>9}')
    for name in models:
        row = info[name]
        print(f'{name:<18} {row["params"] / 1e6:>9.2f} {row["active_params"] / 1e6:>9.2f} '
              f'{row["counted"] / 1e9:>19.4f} {row["active"] / 1e9:>8.4f} {1000 * medians[name]:>9.1f} '
              f'{medians[name] / medians["dense"]:>9.3f}')
    print(f'MoE layer alone (E={largest}, {x.shape[0]} tokens, forward + backward): batched '
          f'{1000 * layer_medians["batched"]:.2f} ms, naive {1000 * layer_medians["naive"]:.2f} ms')
    for name, values in times.items():
        print(f'runs {name}: ' + ' '.join(f'{1000 * v:.1f}' for v in values))

    ratios = ', '.join(f'E={e} {medians[f"moe E={e}"] / medians["dense"]:.3f}' for e in sorted(args.experts))
    flop_ratios = ', '.join(f'E={e} {info[f"moe E={e}"]["active"] / dense_flops:.3f}' for e in sorted(args.experts))
    speedup = medians[f'moe E={largest} naive'] / medians[f'moe E={largest}']
    layer_speedup = layer_medians['naive'] / layer_medians['batched']
    print(f'\nsummary: MoE/dense step time {ratios} (goal <= 1.3; active FLOPs ratio {flop_ratios}); '
          f'batched/naive speed-up at E={largest}: model step {speedup:.2f}x, MoE layer {layer_speedup:.2f}x '
          f'(goal >= 1.5); {args.steps} steps x {args.repeats} runs on {device}, {torch.get_num_threads()} threads')


if __name__ == '__main__':
    main()
