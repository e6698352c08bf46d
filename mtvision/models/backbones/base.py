"""What every backbone returns, so heads never depend on which backbone produced their input."""
from dataclasses import dataclass

from torch import Tensor


@dataclass
class BackboneOutput:
    maps: list[Tensor]  # NCHW feature maps at the backbone's out_indices, shallow to deep
    tokens: Tensor  # final normalised tokens [B, prefix + N, C]
    cls_token: Tensor | None  # [B, C]; None for backbones without a class token
    pooled: Tensor  # [B, C], mean of the final patch tokens
    image_size: tuple[int, int]  # (H, W) of the input images
    # Set only by a masked forward (MAE): which patches the encoder did not see, in the original patch order.
    mask: Tensor | None = None  # [B, N], 0 = visible, 1 = masked
    ids_restore: Tensor | None = None  # [B, N], position of each original patch in the shuffled order

    def representation(self) -> list[Tensor]:
        """The tensors every use of this output flows through, none a function of another: the maps (each a
        branch off its block's output) and the final tokens (``cls_token`` and ``pooled`` are computed from them).
        The gradients of a loss with respect to these, together, are its gradient with respect to the shared
        representation (feature-level gradient surgery)."""
        return [*self.maps, self.tokens]
