"""Self-distillation with a momentum teacher: DINO (Caron et al. 2021) and iBOT's masked patch-token loss (Zhou et al.
2022), trained together as DINOv2 (Oquab et al. 2023) does.

The student (the shared backbone and this head) sees every crop of an image: the global crops, some of their patches
replaced by a mask token when iBOT is on, and the small local crops. The teacher (a momentum copy of the backbone,
kept by :class:`~mtvision.models.multitask.MultiTaskModel` as for MoCo v3, and of this head's projections) sees the
global crops only, unmasked. For each global crop, the teacher's distribution over ``K`` prototypes, centred and
sharpened, is the target of the student's distribution for every *other* crop of the image (DINO); for each masked
patch of a global crop, the teacher's distribution for that patch is the target of the student's (iBOT).

Batches come from :func:`~mtvision.data.collate.collate_crops`: ``images`` holds the global crops view-major
(``images[v * B + i]`` is crop ``v`` of image ``i``), ``local_images`` the local crops, view-major too.
"""
import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

from mtvision.distributed import sum_over_ranks
from mtvision.models.backbones.base import BackboneOutput
from mtvision.models.ema import ema_update
from mtvision.models.heads.contrastive import pooled_feature
from mtvision.registry import MODELS

__all__ = ['DINOHead', 'DINOProjection', 'centered_probabilities', 'masked_token_loss', 'self_distillation_loss',
           'sinkhorn_knopp', 'update_center']

CENTERINGS = ('center', 'sinkhorn_knopp')
NUM_GLOBAL_CROPS = 2  # DINO's two global crops: each is the teacher's target for the other and the local crops


class DINOProjection(nn.Module):
    """DINO's projection head: an MLP (GELU, no normalisation) to a bottleneck, L2-normalised, then a linear layer
    without bias onto ``out_dim`` prototypes whose rows are normalised (DINO's weight-normalised last layer; with
    ``norm_last_layer`` its norms stay 1, else each row learns its own norm, weight_norm's ``g``).

    ``forward(x, freeze_prototypes=True)`` reads the prototypes without a gradient: DINO keeps them fixed during
    the first epoch, which it found to stabilise training.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f'num_layers must be at least 1, got {num_layers}')
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                trunc_normal_(layer.weight, std=.02)
                nn.init.zeros_(layer.bias)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        trunc_normal_(self.prototypes, std=.02)
        self.prototype_norms = None if norm_last_layer else nn.Parameter(torch.ones(out_dim, 1))

    def embed(self, x: Tensor) -> Tensor:
        """The L2-normalised bottleneck ``[..., bottleneck_dim]``."""
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: Tensor, freeze_prototypes: bool = False) -> Tensor:
        """Logits ``[..., out_dim]``: cosines between the bottleneck and the prototypes (times their norms)."""
        prototypes = F.normalize(self.prototypes, dim=-1)
        if self.prototype_norms is not None:
            prototypes = prototypes * self.prototype_norms
        if freeze_prototypes:
            prototypes = prototypes.detach()
        return F.linear(self.embed(x), prototypes)


def centered_probabilities(teacher_logits: Tensor, center: Tensor, temperature: float) -> Tensor:
    """DINO's teacher targets: ``softmax((logits - center) / temperature)``, in float32."""
    return F.softmax((teacher_logits.float() - center) / temperature, dim=-1)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, temperature: float, iterations: int = 3) -> Tensor:
    """DINOv2's (and SwAV's) alternative to centering: ``exp(logits / temperature)`` scaled so that, over the
    global batch, every prototype gets the same total mass and every row sums to 1, by ``iterations`` rounds of
    Sinkhorn-Knopp. The sums run over every rank's rows, so W processes give one process's targets for the global
    batch. ``[R, K]`` rows in, targets ``[R, K]`` out."""
    q = torch.exp(teacher_logits.float() / temperature).T  # [K, R]; logits are cosines, |l / t| stays small
    prototypes = q.shape[0]
    rows = sum_over_ranks(q.new_tensor(float(q.shape[1])))
    q = q / sum_over_ranks(q.sum())
    for _ in range(iterations):
        q = q / sum_over_ranks(q.sum(dim=1, keepdim=True)) / prototypes  # every prototype's mass: 1 / K
        q = q / q.sum(dim=0, keepdim=True) / rows  # every row's mass: 1 / R (rows are local)
    return (q * rows).T


@torch.no_grad()
def update_center(center: Tensor, teacher_logits: Tensor, momentum: float) -> None:
    """``center <- momentum * center + (1 - momentum) * mean(teacher_logits)`` in place, the mean taken over every
    rank's rows (DINO's ``update_center``)."""
    totals = sum_over_ranks(torch.cat([teacher_logits.float().sum(dim=0),
                                       teacher_logits.new_tensor([teacher_logits.shape[0]], dtype=torch.float32)]))
    center.mul_(momentum).add_(totals[:-1] / totals[-1].clamp(min=1), alpha=1 - momentum)


def self_distillation_loss(student_logits: Sequence[Tensor], teacher_targets: Sequence[Tensor],
                           temperature: float) -> Tensor:
    """DINO's loss: the mean, over every pair (teacher crop ``t``, student crop ``s``) with ``s != t``, of the
    cross-entropy ``-sum_k target_t * log_softmax(logits_s / temperature)`` averaged over the images.

    Args:
        student_logits: one ``[B, K]`` tensor per crop, the global crops first, in the teacher's order.
        teacher_targets: one ``[B, K]`` probability tensor per global crop.
        temperature: the student's temperature.
    """
    if len(teacher_targets) > len(student_logits):
        raise ValueError(f'{len(teacher_targets)} teacher crops but only {len(student_logits)} student crops')
    log_probs = [F.log_softmax(logits.float() / temperature, dim=-1) for logits in student_logits]
    losses = [-(target * log_prob).sum(dim=-1).mean()
              for t, target in enumerate(teacher_targets) for s, log_prob in enumerate(log_probs) if s != t]
    if not losses:
        raise ValueError('self-distillation needs at least two crops of each image')
    return torch.stack(losses).mean()


def masked_token_loss(student_logits: Tensor, teacher_targets: Tensor, image_index: Tensor, num_images: int,
                      temperature: float) -> Tensor:
    """iBOT's loss on the masked patches: each masked patch's cross-entropy between the teacher's target and the
    student's ``log_softmax(logits / temperature)``, averaged over the patches of its image, then summed over the
    images and divided by ``num_images`` (images without masked patches count as 0, as in DINOv2).

    Args:
        student_logits, teacher_targets: ``[M, K]``, one row per masked patch.
        image_index: ``[M]``, the image (row of the batch) each masked patch belongs to.
        num_images: the number of images of the batch.
    """
    per_patch = -(teacher_targets * F.log_softmax(student_logits.float() / temperature, dim=-1)).sum(dim=-1)
    patches_per_image = torch.bincount(image_index, minlength=num_images).clamp(min=1)
    return (per_patch / patches_per_image[image_index]).sum() / max(num_images, 1)


@MODELS.register_module()
class DINOHead(nn.Module):
    """DINO self-distillation, with iBOT's masked patch-token loss as an option: the ``dino`` task type's head.

    The teacher's backbone is the model's momentum backbone for this task (``key_features``); the teacher's
    projections live here and follow the student by EMA with ``cosine_momentum(momentum, step, max_steps)``
    (``update_momentum``). The teacher's targets are centred by a running mean of its logits (DINO), or balanced by
    Sinkhorn-Knopp (DINOv2's ``centering='sinkhorn_knopp'``); the centres are buffers, so a run resumes exactly.

    Args:
        embed_dim: width of the backbone tokens.
        in_channels, in_strides: unused; every head is built with the backbone's map geometry.
        feature: the image-level feature: ``'cls'`` (class token) or ``'avg'`` (mean patch token).
        out_dim: the number of prototypes ``K`` (DINO: 65536; small data: a few hundred to thousands).
        hidden_dim, bottleneck_dim, num_layers, norm_last_layer: the projection (DINO: 2048, 256, 3, True).
        student_temperature: the student's softmax temperature (0.1).
        teacher_temperature: the teacher's, after the warm-up (DINO ViT-S: 0.04; DINOv2: 0.07).
        warmup_teacher_temperature, warmup_teacher_temperature_iters: the teacher's temperature rises linearly
            from this value over these many iterations (DINO: 0.04 over 30 epochs).
        centering: ``'center'`` (DINO) or ``'sinkhorn_knopp'`` (DINOv2, 3 iterations).
        center_momentum: the centre's EMA coefficient (0.9).
        momentum: the teacher's EMA coefficient at step 0, raised to 1 by a half cosine (DINO: 0.996).
        freeze_last_layer_iters: iterations during which the prototypes get no gradient (DINO: one epoch).
        ibot: iBOT's masked patch-token loss, off when None; a dict with ``loss_weight`` (1.0), ``separate_head``
            (False, DINOv2's default: the DINO projection reads the patch tokens too; True: a projection of its
            own), ``out_dim`` (with a separate head; default
            ``out_dim``), ``mask_probability`` (0.5: the share of global crops that get masked patches) and
            ``mask_ratio`` ((0.1, 0.5): those crops' masked shares, spread evenly over the range as DINOv2 does).
            Patches are masked one by one at random (DINOv2 masks blocks); needs a backbone that replaces patches
            by a mask token (:class:`~mtvision.models.backbones.vit.ViT`).
        dino_loss_weight: the weight of the image-level loss (1.0).
    """

    def __init__(self, embed_dim: int, in_channels: Sequence[int] = (), in_strides: Sequence[int] = (),
                 feature: str = 'cls', out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, norm_last_layer: bool = True, student_temperature: float = 0.1,
                 teacher_temperature: float = 0.04, warmup_teacher_temperature: float = 0.04,
                 warmup_teacher_temperature_iters: int = 0, centering: str = 'center', center_momentum: float = 0.9,
                 momentum: float = 0.996, freeze_last_layer_iters: int = 0, ibot: dict | None = None,
                 dino_loss_weight: float = 1.0):
        super().__init__()
        if feature not in ('cls', 'avg'):
            raise ValueError(f"feature must be 'cls' or 'avg', got {feature!r}")
        if centering not in CENTERINGS:
            raise ValueError(f'centering must be one of {CENTERINGS}, got {centering!r}')
        if not 0 <= momentum <= 1 or not 0 <= center_momentum <= 1:
            raise ValueError(f'momentum and center_momentum must be in [0, 1], got {momentum} and {center_momentum}')
        if min(student_temperature, teacher_temperature, warmup_teacher_temperature) <= 0:
            raise ValueError('temperatures must be positive')
        self.feature = feature
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.warmup_teacher_temperature = warmup_teacher_temperature
        self.warmup_teacher_temperature_iters = warmup_teacher_temperature_iters
        self.centering = centering
        self.center_momentum = center_momentum
        self.momentum = momentum
        self.freeze_last_layer_iters = freeze_last_layer_iters
        self.dino_loss_weight = dino_loss_weight
        self.step = 0  # set by start_step before each training step
        projection = dict(hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim, num_layers=num_layers,
                          norm_last_layer=norm_last_layer)
        self.student = DINOProjection(embed_dim, out_dim, **projection)
        self.teacher = self._momentum_copy(self.student)
        self.register_buffer('center', torch.zeros(1, out_dim))
        self.ibot = self._ibot_settings(ibot, out_dim)
        self.mask_token = None
        if self.ibot is not None:
            if self.ibot['separate_head']:
                self.ibot_student = DINOProjection(embed_dim, self.ibot['out_dim'], **projection)
                self.ibot_teacher = self._momentum_copy(self.ibot_student)
            self.register_buffer('patch_center', torch.zeros(1, self.ibot['out_dim']))
            # DINOv2 starts its mask token at zero
            self.mask_token = nn.Parameter(torch.zeros(embed_dim))

    @staticmethod
    def _momentum_copy(module: DINOProjection) -> DINOProjection:
        return copy.deepcopy(module).requires_grad_(False)

    @staticmethod
    def _ibot_settings(ibot: dict | None, out_dim: int) -> dict | None:
        if ibot is None:
            return None
        settings = dict(loss_weight=1.0, separate_head=False, out_dim=out_dim, mask_probability=0.5,
                        mask_ratio=(0.1, 0.5))
        unknown = set(ibot) - set(settings)
        if unknown:
            raise ValueError(f'ibot: unknown keys {sorted(unknown)}; known: {sorted(settings)}')
        settings.update(ibot)
        low, high = settings['mask_ratio']
        if not 0 <= low <= high < 1 or not 0 <= settings['mask_probability'] <= 1:
            raise ValueError(f'ibot: mask_ratio must be (low, high) with 0 <= low <= high < 1 and mask_probability in '
                             f'[0, 1], got {settings["mask_ratio"]} and {settings["mask_probability"]}')
        if not settings['separate_head'] and settings['out_dim'] != out_dim:
            raise ValueError(f'ibot: out_dim {settings["out_dim"]} differs from the DINO projection\'s {out_dim}, '
                             f'which a shared head (separate_head=False) uses')
        return settings

    def start_step(self, step: int, max_steps: int) -> None:
        """Called before each training step: the teacher temperature and the prototype freeze follow ``step``."""
        self.step = step

    def teacher_temperature_at(self, step: int) -> float:
        """DINO's schedule: linear from ``warmup_teacher_temperature`` to ``teacher_temperature`` over
        ``warmup_teacher_temperature_iters`` iterations, then constant."""
        if step >= self.warmup_teacher_temperature_iters:
            return self.teacher_temperature
        progress = step / self.warmup_teacher_temperature_iters
        return self.warmup_teacher_temperature + progress * (self.teacher_temperature -
                                                              self.warmup_teacher_temperature)

    def sample_patch_mask(self, rows: int, num_patches: int, device: torch.device) -> Tensor | None:
        """iBOT's masks ``[rows, num_patches]`` (True = masked) for a batch of global crops, or None without iBOT:
        ``int(rows * mask_probability)`` crops, in random rows, mask ratios spread evenly over ``mask_ratio`` (one
        draw in each of as many equal bins, as DINOv2's collate), each masking that share of its patches at random;
        the other crops are not masked. Drawn with the global torch RNG."""
        if self.ibot is None:
            return None
        masked_rows = int(rows * self.ibot['mask_probability'])
        low, high = self.ibot['mask_ratio']
        bounds = torch.linspace(low, high, masked_rows + 1)
        ratios = bounds[:-1] + torch.rand(masked_rows) * (bounds[1:] - bounds[:-1])
        counts = (ratios * num_patches).long()
        ranks = torch.rand(masked_rows, num_patches).argsort(dim=1).argsort(dim=1)
        mask = torch.zeros(rows, num_patches, dtype=torch.bool)
        mask[:masked_rows] = ranks < counts[:, None]
        return mask[torch.randperm(rows)].to(device)

    def forward(self, features: BackboneOutput, key_features: BackboneOutput | None = None,
                local_features: BackboneOutput | None = None) -> dict:
        """The student's logits for every crop, the teacher's for the global crops and, with iBOT, both for the
        masked patches. ``features``: the student's global crops (masked when iBOT is on and the model trains),
        ``key_features``: the teacher's (momentum backbone, unmasked), ``local_features``: the student's local
        crops."""
        freeze = self.training and self.step < self.freeze_last_layer_iters
        student = pooled_feature(features, self.feature)
        outputs = dict(embeddings=self.student.embed(student),
                       student_logits=self.student(student, freeze_prototypes=freeze))
        if local_features is not None:
            outputs['local_logits'] = self.student(pooled_feature(local_features, self.feature),
                                                   freeze_prototypes=freeze)
        if key_features is not None:
            with torch.no_grad():
                outputs['teacher_logits'] = self.teacher(pooled_feature(key_features, self.feature))
        if self.ibot is not None and features.mask is not None and key_features is not None:
            mask = features.mask.bool()
            num_patches = mask.shape[1]
            for name, output in (('features', features), ('key_features', key_features)):
                if output.tokens.shape[1] < num_patches:
                    raise ValueError(f'iBOT needs a patch token for each of the {num_patches} masked-grid patches, '
                                     f'but the {name} hold {output.tokens.shape[1]} tokens: use a plain ViT backbone')
            student_patches = features.tokens[:, -num_patches:][mask]
            image_index = mask.nonzero()[:, 0]
            student_projection = self.ibot_student if self.ibot['separate_head'] else self.student
            teacher_projection = self.ibot_teacher if self.ibot['separate_head'] else self.teacher
            outputs.update(patch_logits=student_projection(student_patches, freeze_prototypes=freeze),
                           patch_image_index=image_index, num_masked_images=mask.shape[0])
            with torch.no_grad():
                outputs['teacher_patch_logits'] = teacher_projection(key_features.tokens[:, -num_patches:][mask])
        return outputs

    def _targets(self, teacher_logits: Tensor, center: Tensor, temperature: float) -> Tensor:
        with torch.no_grad():
            if self.centering == 'sinkhorn_knopp':
                return sinkhorn_knopp(teacher_logits, temperature)
            targets = centered_probabilities(teacher_logits, center, temperature)
            if self.training:  # after the targets: they use the centre of the steps before, as DINO's
                update_center(center, teacher_logits, self.center_momentum)
        return targets

    def loss(self, outputs: dict, targets=None) -> dict[str, Tensor]:
        if 'teacher_logits' not in outputs:
            raise ValueError('DINOHead.loss needs the teacher\'s logits: call it through MultiTaskModel, which passes '
                             'the momentum backbone features')
        rows, remainder = divmod(outputs['teacher_logits'].shape[0], NUM_GLOBAL_CROPS)
        if remainder:
            raise ValueError(f'a DINO batch stacks {NUM_GLOBAL_CROPS} global crops of each image, but it holds '
                             f'{outputs["teacher_logits"].shape[0]} images: collate it with collate_crops')
        temperature = self.teacher_temperature_at(self.step)
        teacher_targets = self._targets(outputs['teacher_logits'], self.center, temperature).split(rows)
        student = list(outputs['student_logits'].split(rows))
        if outputs.get('local_logits') is not None and len(outputs['local_logits']):
            student += list(outputs['local_logits'].split(rows))
        terms = dict(loss_dino=self.dino_loss_weight * self_distillation_loss(student, teacher_targets,
                                                                               self.student_temperature))
        if 'patch_logits' in outputs:
            patch_targets = self._targets(outputs['teacher_patch_logits'], self.patch_center, temperature)
            terms['loss_ibot'] = self.ibot['loss_weight'] * masked_token_loss(
                outputs['patch_logits'], patch_targets, outputs['patch_image_index'], outputs['num_masked_images'],
                self.student_temperature)
        return terms

    @torch.no_grad()
    def update_momentum(self, momentum: float) -> None:
        """``teacher <- momentum * teacher + (1 - momentum) * student`` for the projections."""
        ema_update(self.teacher, self.student, momentum)
        if self.ibot is not None and self.ibot['separate_head']:
            ema_update(self.ibot_teacher, self.ibot_student, momentum)

    @torch.no_grad()
    def predict(self, outputs: dict) -> Tensor:
        """The student's L2-normalised bottleneck embeddings of the global crops, view-major (view retrieval)."""
        return outputs['embeddings'].float()
