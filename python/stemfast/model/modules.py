"""Thin ``nn.Module`` wrappers: spatial-transformer angle head, conv encoder / decoder, VAE and rVAE.

All modules take patches ``(B, 1, S, S)`` at the model's ``input_size`` (a multiple of 8). The
angle convention is the one of :mod:`stemfast.model.functional` (degrees, counter-clockwise as
displayed with y down).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from . import functional as MF

__all__ = ["STN", "Encoder", "Decoder", "VAENet", "RVAENet", "ModelOutput"]


class ModelOutput(NamedTuple):
    """Forward pass result. ``recon`` is in the input frame; ``canonical_recon`` is the decoder output."""

    recon: torch.Tensor  # (B, 1, S, S)
    mu: torch.Tensor  # (B, L)
    logvar: torch.Tensor  # (B, L)
    angle: torch.Tensor | None  # (B,) degrees, None for the plain VAE
    canonical_recon: torch.Tensor  # (B, 1, S, S)
    #: (B,) length of the STN's k-th harmonic vector: how strongly the patch has one orientation
    #: (near 0 for a patch that looks the same at every multiple of 360 / 2k); None for the plain VAE
    angle_strength: torch.Tensor | None = None


class STN(nn.Module):
    """Predict one orientation per patch, equivariant by construction of its head.

    A small CNN maps the patch (2x average-pooled, for speed) to a scalar weight map ``w(p)``. The head
    pools it against the k-th angular harmonic with a learned, rotation-invariant radial profile
    ``rho(r)``::

        (C, S) = sum_p w(p) rho(|p|) (cos k phi_p, sin k phi_p),   theta = atan2(S, C) / k

    i.e. the network predicts ``(cos k theta, sin k theta)`` (up to a positive norm). If the
    weight map rotates with the input (which STN pretraining enforces; a 3x3 CNN is nearly
    rotation-equivariant), rotating the patch by ``a`` multiplies ``C + iS`` by ``exp(i k a)``
    exactly, so ``theta(rotate(x, a)) = theta(x) + a (mod 360 / k)``; a dense ``Linear -> (cos, sin)``
    head would have to learn that equivariance entirely from data.

    ``symmetry`` = k is the rotation order of the *site* (the patch content), which fixes the
    canonical frame up to ``360 / k``. Use 3 for MoS2 / hBN-like sites (C3v): the neighbour shell
    has six directions but a Mo site's 3 S2 neighbours turn into a different image under a 60 deg
    rotation, so k = 6 would leave two canonical variants per site type (on synthetic MoS2 patches
    k = 6 still separates the site types, but the validation loss doubles: 18.5 vs 8.4, because
    the decoder cannot tell the two variants apart). Use 6 for graphene-like or triangular lattices
    with 6-fold sites, 4 for square lattices.

    Parameters
    ----------
    input_size : int
        Patch size S (px).
    symmetry : int
        k >= 1.
    channels : (int, int)
        Widths of the two conv layers.
    n_radial : int
        Number of Gaussian radial basis functions of ``rho``.
    downsample : {1, 2}
        Average-pool factor applied before the CNN (2: ~3x cheaper, same accuracy on our data).

    Shapes: ``forward(x: (B, 1, S, S)) -> (angle (B,) degrees in (-180/k, 180/k], harmonic (B, 2))``.
    """

    def __init__(self, input_size: int = 32, symmetry: int = 3, channels: tuple[int, int] = (8, 8),
                 n_radial: int = 6, downsample: int = 2) -> None:
        super().__init__()
        if symmetry < 1:
            raise ValueError(f"symmetry must be >= 1, got {symmetry}")
        if input_size % 2:
            raise ValueError(f"input_size must be even, got {input_size}")
        self.symmetry = int(symmetry)
        c1, c2 = channels
        if downsample not in (1, 2) or input_size % downsample:
            raise ValueError(f"downsample must be 1 or 2 and divide input_size, got {downsample}")
        self.features = nn.Sequential(
            nn.AvgPool2d(downsample) if downsample > 1 else nn.Identity(),
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c2, 1, 1),
        )
        h = input_size // downsample
        r, phi = MF.polar_angle_grid(h)
        r = r * (input_size / h)  # in input pixels
        rmax = input_size / 2.0
        centres = torch.linspace(0.0, rmax, n_radial)
        width = rmax / max(n_radial - 1, 1)
        basis = torch.exp(-((r[None] - centres[:, None, None]) ** 2) / (2 * width**2))
        # zero the far tails: float32 subnormals there make CPU arithmetic ~100x slower
        basis = torch.where((basis > 1e-6) & (r[None] <= rmax), basis, torch.zeros(()))
        self.register_buffer("radial_basis", basis, persistent=False)  # (J, h, h)
        k = self.symmetry
        self.register_buffer("harm", torch.stack([torch.cos(k * phi), torch.sin(k * phi)]), persistent=False)
        self.radial_weight = nn.Parameter(torch.ones(n_radial))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The last layer (1x1 conv to the weight map w) is linear, so it is folded into the harmonic
        # pooling: sum_p w(p) kern(p) = sum_{c,p} h_c(p) W_c kern(p) + b sum_p kern(p), one
        # (B, C h w) x (C h w, 2) matmul instead of a 1-output-channel convolution (the slowest layer
        # on CPU) and a second pass over w. Same weights and state_dict; equal up to float rounding.
        h = self.features[:-1](x)  # (B, C, h, w)
        head = self.features[-1]
        with torch.autocast(device_type=x.device.type, enabled=False):  # the angle needs full precision
            h = h.float()
            rho = torch.einsum("j,jhw->hw", self.radial_weight.float(), self.radial_basis.float())
            kern = self.harm.float() * rho[None]  # (2, h, w)
            weight = head.weight.float()[0, :, 0, 0]  # (C,)
            k_full = (weight[:, None, None, None] * kern[None]).permute(0, 2, 3, 1).reshape(-1, 2)  # (C h w, 2)
            harmonic = h.reshape(h.shape[0], -1) @ k_full
            if head.bias is not None:
                harmonic = harmonic + head.bias.float()[0] * kern.sum((1, 2))
        angle = MF.angle_from_harmonic(harmonic[:, 0], harmonic[:, 1], self.symmetry)
        return angle, harmonic


class Encoder(nn.Module):
    """Three stride-2 convolutions and a linear layer: ``(B, 1, S, S) -> (mu (B, L), logvar (B, L))``."""

    def __init__(self, input_size: int = 32, latent_dim: int = 4, channels: tuple[int, int, int] = (8, 16, 32)) -> None:
        super().__init__()
        if input_size % 8:
            raise ValueError(f"input_size must be a multiple of 8, got {input_size}")
        c1, c2, c3 = channels
        self.net = nn.Sequential(
            nn.Conv2d(1, c1, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c2, c3, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Flatten(),
        )
        self.head = nn.Linear(c3 * (input_size // 8) ** 2, 2 * latent_dim)
        self.latent_dim = latent_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.head(self.net(x))
        mu, logvar = h[:, : self.latent_dim], h[:, self.latent_dim:]
        return mu, logvar.clamp(-12.0, 8.0)


class Decoder(nn.Module):
    """Linear layer and three (3x3 conv + 2x pixel shuffle) upsamplings: ``z (B, L) -> (B, 1, S, S)``.

    Sub-pixel convolutions run 2-3x faster than transposed convolutions on CPU at equal width.
    """

    def __init__(self, input_size: int = 32, latent_dim: int = 4, channels: tuple[int, int, int] = (8, 16, 32)) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.s0 = input_size // 8
        self.c3 = c3
        self.fc = nn.Sequential(nn.Linear(latent_dim, c3 * self.s0 * self.s0), nn.ReLU(inplace=True))
        self.net = nn.Sequential(
            nn.Conv2d(c3, 4 * c2, 3, padding=1), nn.PixelShuffle(2), nn.ReLU(inplace=True),
            nn.Conv2d(c2, 4 * c1, 3, padding=1), nn.PixelShuffle(2), nn.ReLU(inplace=True),
            nn.Conv2d(c1, 4, 3, padding=1), nn.PixelShuffle(2),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(-1, self.c3, self.s0, self.s0)
        if h.device.type != "cpu" or torch.is_grad_enabled():
            return self.net(h)
        # CPU inference: the first two upsampling stages run channels-last (their pixel shuffles
        # become cheap copies; ~15 % faster decoder), the last one contiguous (where channels-last is
        # slower). Not when training: the backward pass is slower in channels-last.
        h = self.net[:6](h.contiguous(memory_format=torch.channels_last))
        return self.net[6:](h.contiguous())


class VAENet(nn.Module):
    """Plain convolutional VAE on disc-masked patches (the baseline; no rotation handling).

    ``forward(x (B, 1, S, S)) -> ModelOutput`` with ``angle=None``; ``z = mu`` in eval mode.
    """

    def __init__(self, input_size: int = 32, latent_dim: int = 4, channels: tuple[int, int, int] = (8, 16, 32),
                 mask_radius: float | None = None) -> None:
        super().__init__()
        self.input_size = input_size
        self.encoder = Encoder(input_size, latent_dim, channels)
        self.decoder = Decoder(input_size, latent_dim, channels)
        self.register_buffer("mask", MF.circular_mask(input_size, mask_radius), persistent=False)

    def encode_decode(self, xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(xc)
        z = MF.reparameterize(mu, logvar) if self.training else mu
        return self.decoder(z), mu, logvar

    def forward(self, x: torch.Tensor) -> ModelOutput:
        x = x * self.mask
        y, mu, logvar = self.encode_decode(x)
        return ModelOutput(y, mu, logvar, None, y)


class RVAENet(VAENet):
    """STN + VAE: canonicalise by the STN angle, encode / decode, rotate the decoding back.

    The STN fixes the orientation only modulo ``360 / k`` (k = ``symmetry``): the canonical patch
    is one of k branches ``rotate(x, -(theta + j 360 / k))``. The site itself looks the same in all
    branches, but anything that is not k-fold symmetric (sub-pixel offset, noise, a defect on one
    neighbour) would be encoded differently per branch, so the latent code would jump whenever a
    rotation moves ``theta`` across the branch cut. ``symmetrize`` removes that:

    * ``"image"`` (default): the encoder sees the mean of the k branches (the C_k average of the
      canonical patch; one encoder pass);
    * ``"features"``: the encoder runs on every branch and ``mu`` / ``logvar`` are averaged (k
      encoder passes; keeps non-linear features of asymmetric content);
    * ``"none"``: branch 0 only (the code may jump at the branch cut).

    Both averaging modes make ``mu`` / ``logvar`` exactly invariant to the branch choice. The
    decoder reconstructs branch 0, which is rotated back by ``+theta``.

    ``forward(x (B, 1, S, S)) -> ModelOutput``: ``recon = rotate(decoder(z), +theta)`` in the input
    frame, ``canonical_recon = decoder(z)``, ``angle = theta`` (degrees).
    """

    SYMMETRIZE = ("image", "features", "none")

    def __init__(self, input_size: int = 32, latent_dim: int = 4, channels: tuple[int, int, int] = (8, 16, 32),
                 mask_radius: float | None = None, symmetry: int = 3,
                 stn_channels: tuple[int, int] = (8, 8), symmetrize: str = "image", stn_downsample: int = 2) -> None:
        super().__init__(input_size, latent_dim, channels, mask_radius)
        if symmetrize not in self.SYMMETRIZE:
            raise ValueError(f"symmetrize must be one of {self.SYMMETRIZE}, got {symmetrize!r}")
        self.stn = STN(input_size, symmetry, stn_channels, downsample=stn_downsample)
        self.symmetrize = symmetrize if symmetry > 1 else "none"

    def canonical(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked canonical patches (branch 0) and STN angles: ``(B, 1, S, S) -> ((B, 1, S, S), (B,))``."""
        angle, _ = self.stn(x * self.mask)
        return MF.canonicalize(x, angle) * self.mask, angle

    def encode_branches(self, x: torch.Tensor, angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the canonical branches of ``x``: returns (masked branch-0 patch, mu, logvar).

        ``x`` is the *full* (unmasked) patch: it is rotated first and masked afterwards. Every
        bilinear sample of a rotated disc pixel lies inside the pixel grid
        (:func:`settings.default_mask_radius`), so the disc of the canonical patch holds exactly
        the rotated content of the input disc; masking *before* rotating would instead blend zeros
        into a ring at the disc edge whose position depends on the angle (an angle-dependent
        artefact, large where bright columns sit on the disc edge).

        Branch j is ``rotate(branch 0, j 360 / k)``; one angle for the whole batch, so those
        rotations share a single sampling grid (:func:`functional.rotate_all`). Their samples at the
        disc edge reach up to ~0.7 px beyond the disc, where branch 0 is read from just outside the
        patch: border padding there (instead of zeros) keeps a constant patch constant.
        """
        xc = MF.canonicalize(x, angle, padding_mode="border")  # unmasked, see above
        k = self.stn.symmetry
        xc0 = xc * self.mask
        if self.symmetrize == "none":
            mu, logvar = self.encoder(xc0)
        elif self.symmetrize == "image":
            mu, logvar = self.encoder(MF.symmetrize(xc, k) * self.mask)
        else:
            xs = torch.stack([xc0] + [MF.rotate_all(xc, 360.0 * j / k) * self.mask for j in range(1, k)], 1)
            mu, logvar = self.encoder(xs.flatten(0, 1))
            mu, logvar = mu.view(xc.shape[0], k, -1).mean(1), logvar.view(xc.shape[0], k, -1).mean(1)
        return xc0, mu, logvar

    def forward(self, x: torch.Tensor) -> ModelOutput:
        angle, harmonic = self.stn(x * self.mask)
        _, mu, logvar = self.encode_branches(x, angle)
        z = MF.reparameterize(mu, logvar) if self.training else mu
        yc = self.decoder(z)
        y = MF.uncanonicalize(yc, angle)
        return ModelOutput(y, mu, logvar, angle, yc, harmonic.norm(dim=1))
