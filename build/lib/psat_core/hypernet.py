"""The PSAT weight generator: a two-layer linear hypernetwork (paper eqs. 8, 11; Ha et al. 2017).

One generator H_p is shared by every generated conv layer of a member. Each 64x64 output unit of
each layer has its own learnable embedding z. For an embedding z (dimension d):

    h      = z W_in + B_in            reshaped to (64_out, d)
    kernel = h W_out + B_out          reshaped to (64_out, 64_in, 3, 3)

so H_p has d*64d + 64d + d*576 + 576 parameters and the embeddings add d per unit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

UNIT = 64  # the output unit is UNIT x UNIT x 3 x 3 (paper: "Generated parameter unification")
REDUCTIONS = ("sum", "avg", "max")


class HyperNetwork(nn.Module):
    """Two-layer linear generator of 64x64x3x3 conv units (eq. 11).

    Args:
        embedding_dim: d, the dimension of every layer embedding z.
        reduction: how a 3x3 unit becomes a 1x1 kernel: "sum" (default), "avg" or "max".
            "sum" keeps a 1x1 kernel at the Kaiming scale of a 64-input 1x1 conv when the
            3x3 units start at the Kaiming scale of a 64x3x3 conv. "sum" and "avg" are linear,
            so they are folded into the generator (see `units_1x1`) instead of generating 3x3
            units and reducing them.
    """

    def __init__(self, embedding_dim: int, reduction: str = "sum"):
        super().__init__()
        if not isinstance(embedding_dim, int) or embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be a positive integer, got {embedding_dim!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        d = embedding_dim
        self.embedding_dim = d
        self.reduction = reduction
        # Init: z ~ N(0, 1) makes h ~ N(0, 1); W_out ~ N(0, s^2/d) then gives kernel ~ N(0, s^2)
        # with s the Kaiming std of a 64-input 3x3 conv.
        kaiming = math.sqrt(2.0 / (UNIT * 9))
        self.w_in = nn.Parameter(torch.randn(d, UNIT * d) / math.sqrt(d))
        self.b_in = nn.Parameter(torch.zeros(UNIT * d))
        self.w_out = nn.Parameter(torch.randn(d, UNIT * 9) * kaiming / math.sqrt(d))
        self.b_out = nn.Parameter(torch.zeros(UNIT * 9))

    def units_3x3(self, z: Tensor) -> Tensor:
        """Generate 3x3 units (eq. 11). z: (n, d) -> (n, 64_out, 64_in, 3, 3)."""
        n, d = z.shape
        h = (z @ self.w_in + self.b_in).view(n * UNIT, d)  # (n*64_out, d)
        return (h @ self.w_out + self.b_out).view(n, UNIT, UNIT, 3, 3)

    def units_1x1(self, z: Tensor) -> Tensor:
        """The 3x3 unit of z reduced over its kernel. z: (n, d) -> (n, 64_out, 64_in, 1, 1).

        For a linear reduction R (sum/avg over the 9 taps), R(h W_out + B_out) equals
        h R(W_out) + R(B_out), and h = z W_in + B_in is linear too, so the whole map collapses
        into one (d, 64*64) matrix: the cost per unit drops from 64*d*(d+576) to 64*64*d
        multiply-adds.
        """
        if self.reduction == "max":
            return self.units_3x3(z).amax(dim=(3, 4), keepdim=True)
        n, d = z.shape
        w_out = self.w_out.view(d, UNIT, 9).sum(-1)  # (d, 64_in)
        b_out = self.b_out.view(UNIT, 9).sum(-1)
        if self.reduction == "avg":
            w_out, b_out = w_out / 9, b_out / 9
        w_in = self.w_in.view(d, UNIT, d)  # (d, 64_out, d)
        fused = (w_in @ w_out).view(d, UNIT * UNIT)  # (d, 64_out*64_in)
        bias = (self.b_in.view(UNIT, d) @ w_out + b_out).view(UNIT * UNIT)
        return (z @ fused + bias).view(n, UNIT, UNIT, 1, 1)


def tile_units(units: Tensor, out_channels: int, in_channels: int) -> Tensor:
    """Concatenate a layer's units along the filter and channel dimensions.

    units: (ro*ri, 64_out, 64_in, k, k) in row-major (output block, input block) order
    -> (out_channels, in_channels, k, k) with out_channels = 64*ro, in_channels = 64*ri.
    """
    ro, ri = out_channels // UNIT, in_channels // UNIT
    k = units.shape[-1]
    blocks = units.view(ro, ri, UNIT, UNIT * k * k)  # rows of 64_in*k*k stay contiguous
    return blocks.transpose(1, 2).reshape(out_channels, in_channels, k, k)
