"""The DISA descriptor network (Ronchetti et al., MICCAI 2023, "DISA: DIfferentiable Similarity
Approximation for Universal Multimodal Registration").

A small fully convolutional 3D CNN ``phi`` whose per-voxel 16-channel output approximates the LC²
similarity of two patches by a dot product: ``LC2(P1, P2) ~ <phi(P1), phi(P2)>``.  The layer layout
follows the authors' published training code (``neural.py`` and ``train.py`` of
github.com/ImFusionGmbH/DISA-universal-multimodal-registration):

=====  ===============================  ===============================  ==========
index  layer                            shape of the weights             parameters
=====  ===============================  ===============================  ==========
0      conv 3³ 1→8 (+bias) + LeakyReLU  8·1·27 + 8                          224
1      residual block, 8 channels       2 · (8·8·27 + 8)                  3,472
2      conv 3³ 8→16 (+bias) + LeakyReLU 16·8·27 + 16                      3,472
3      blur-pool, 16 channels, stride 2 fixed buffer                          0
4      residual block, 16 channels      2 · (16·16·27 + 16)              13,856
5      conv 3³ 16→32 (+bias) + LReLU    32·16·27 + 32                    13,856
6      blur-pool, 32 channels, stride 2 fixed buffer                          0
7      residual block, 32 channels      2 · (32·32·27 + 32)              55,360
8      conv 1³ 32→16, no bias           16·32                               512
=====  ===============================  ===============================  ==========
                                                               total     90,752

Facts taken from the official code (not copied from it):

* every 3×3×3 convolution has a bias, zero padding of 1 ("same" size) and is followed by
  ``LeakyReLU`` with PyTorch's default negative slope **0.01**;
* a residual block is two such conv+LeakyReLU pairs, and the skip is added **after** the second
  activation: ``y = x + act(conv(act(conv(x))))`` -- there is **no** activation after the sum;
* blur-pool is a depthwise [1,4,6,4,1]⊗[1,4,6,4,1]⊗[1,4,6,4,1] kernel normalised to sum 1, applied
  after **replicate** padding of 2 voxels on every side, with stride 2 (the official code keeps the
  kernel as a ``Parameter`` with ``requires_grad=False``; here it is a buffer, so it is neither in
  ``parameters()`` nor trained);
* no normalisation layer; the last layer is a 1×1×1 convolution without bias;
* each output vector is divided by ``max(1, ||y||)`` (in the official code this clipping is in the
  training step; here it is part of :meth:`DISANet.forward` so the descriptors are always usable).

Output grid
-----------
The convolutions keep the size; a blur-pool maps a length ``n`` to ``ceil(n / 2)`` and its output
index ``m`` is centred on input index ``2m``.  So an input of shape (D, H, W) gives descriptors of
shape (ceil(D/4), ceil(H/4), ceil(W/4)), and descriptor voxel (k, j, i) is centred on input voxel
(4k, 4j, 4i) -- offset 0, no half-voxel shift.  (The official training confirms it: patches are
resampled to 33³, the network gives 9³, and the loss uses output voxel 4 = input voxel 16, the
patch centre.)  :func:`descriptor_geometry` turns this into a physical grid: same origin and
direction, spacing × 4.

Receptive field
---------------
Every kernel is centred, so descriptor (k, j, i) depends exactly on the input voxels within
±24 of (4k, 4j, 4i): ``RECEPTIVE_FIELD = 49`` voxels per axis.  Sum of (kernel − 1) × stride so
far: 1 + 4 convs·2 (at stride 1) + 4 (blur) + 3 convs·2·2 (stride 2) + 4·2 (blur) + 2 convs·2·4
(stride 4) + 0 (1×1 conv) = 1 + 8 + 4 + 12 + 8 + 16 = 49.  At the training
spacing of 2 mm that is 98 mm.

Finer descriptors (output stride 2)
-----------------------------------
``DISANet.forward(x, output_stride=2)`` runs the same weights *à trous* (Mallat's "with holes"):
the second blur-pool keeps every position (stride 1; its five taps stay consecutive on the 2-voxel
grid), and the layers after it, which saw neighbours 4 input voxels apart, are dilated by 2 so they
still do.  The result is a map of ceil(n/2) descriptors per axis, centred on input voxels 2m, whose
even sites equal the stride-4 map (the network is evaluated, not changed) and whose odd sites are
the same network centred half a cell further.  Receptive field and border handling are unchanged.
Why: at 8 mm the dense deformable stage sees too little variation of the cost within its ±12 mm
search (docs/benchmarks.md, "the issue's deformable test case on the brain").

Small volumes and large volumes
-------------------------------
:func:`compute_descriptors` replicate-pads every axis shorter than RECEPTIVE_FIELD to 49 voxels
(low-side padding a multiple of 4, so the grid stays aligned) and crops the result back, silently:
this is the documented behaviour, not a warning.  An axis shorter than MIN_AXIS_SIZE = 8 voxels
(fewer than 2 descriptors) is refused with :class:`InvalidImageError`.  With ``chunk`` it works in
z-slabs carrying a halo of SLAB_HALO = 28 slices (≥ 24 needed), which gives the single-pass result.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..device import resolve_device
from ..errors import InvalidImageError, InvalidParameterError
from ..image.geometry import ImageGeometry
from ..image.volume import Volume

#: Channels of a descriptor vector.
DESCRIPTOR_CHANNELS = 16
#: Total stride: descriptor voxel (k, j, i) sits on input voxel (4k, 4j, 4i).
OUTPUT_STRIDE = 4
#: Output strides the network can be evaluated at: 4 (as trained) and 2 (à trous, see the module docstring).
OUTPUT_STRIDES = (4, 2)
#: Negative slope of every LeakyReLU (PyTorch's default, as in the official code).
LEAKY_SLOPE = 0.01
#: Receptive field per axis, in input voxels (see the module docstring for the sum).
RECEPTIVE_FIELD = 49
#: Half of it: descriptor (k, j, i) depends on input voxels within ±HALF_RECEPTIVE_FIELD of 4·(k, j, i).
HALF_RECEPTIVE_FIELD = RECEPTIVE_FIELD // 2
#: A volume thinner than this along any axis is refused (fewer than 2 descriptors along it).
MIN_AXIS_SIZE = 8
#: Number of trainable parameters of the published network.
EXPECTED_PARAMETERS = 90_752
#: Arithmetic the network's layers may run in (:func:`compute_descriptors`); descriptors come out float32.
PRECISIONS = ("float32", "bfloat16")
#: Extra input slices carried on each side of a z-slab: the half receptive field (24) rounded up
#: to a multiple of the stride and beyond it, so that neighbouring slabs overlap by
#: 2·28 − 3 = 53 ≥ RECEPTIVE_FIELD input slices.
SLAB_HALO = 28

_BINOMIAL_5 = (1.0, 4.0, 6.0, 4.0, 1.0)


# ---------------------------------------------------------------------------------- layers
def _conv_act(in_channels: int, out_channels: int) -> nn.Sequential:
    """3×3×3 convolution with bias and zero 'same' padding, then LeakyReLU(0.01)."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=True),
        nn.LeakyReLU(negative_slope=LEAKY_SLOPE, inplace=True),
    )


class ResidualBlock(nn.Module):
    """``x + act(conv(act(conv(x))))``: the skip is added after the second activation."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(_conv_act(channels, channels), _conv_act(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(x)
        # in place when nothing is recorded for a backward pass (the LeakyReLU's output is kept for it)
        return x + h if torch.is_grad_enabled() else h.add_(x)

    def dilated(self, x: torch.Tensor, dilation: int) -> torch.Tensor:
        """The same block with its convolutions' taps ``dilation`` voxels apart (zero padding to match)."""
        h = x
        for conv_act in self.layers:
            conv = conv_act[0]
            h = F.leaky_relu(F.conv3d(h, conv.weight, conv.bias, padding=dilation, dilation=dilation), LEAKY_SLOPE)
        return x + h


def binomial_kernel_3d(channels: int) -> torch.Tensor:
    """The depthwise blur kernel: [1,4,6,4,1]³ / its sum, shape (channels, 1, 5, 5, 5)."""
    b = torch.tensor(_BINOMIAL_5, dtype=torch.float64)
    k = b[:, None, None] * b[None, :, None] * b[None, None, :]
    k = k / k.sum()
    return k.to(torch.float32).expand(channels, 1, 5, 5, 5).contiguous()


class BlurPool3d(nn.Module):
    """Anti-aliased downsampling (Zhang 2019): fixed binomial low-pass, replicate padding, stride 2.

    A length ``n`` becomes ``ceil(n / 2)``; output index ``m`` is centred on input index ``2m``.
    The kernel is a (persistent=False) buffer: it follows ``.to()`` but is not a parameter and is
    not stored in ``state_dict`` (it is a constant of the architecture).
    """

    def __init__(self, channels: int, stride: int = 2) -> None:
        super().__init__()
        self.channels = channels
        self.stride = stride
        self.pad = 2
        self.register_buffer("f", binomial_kernel_3d(channels), persistent=False)

    def forward(self, x: torch.Tensor, stride: int | None = None) -> torch.Tensor:
        """``stride`` overrides the layer's own (1: the same low-pass at every position, for à trous).

        Computed as a zero-padded convolution, then the few output planes at each end of each axis
        whose 5-tap window reaches past the input are computed again with replicate padding (from
        thin slabs), which makes the result the replicate-padded blur.  Why: replicate-padding the
        whole input copies it (at full resolution, 16 channels, about as long as the blur itself);
        the zero-padded convolution needs no copy.  Same values to float rounding (tests).
        """
        s = self.stride if stride is None else stride
        f = self.f.to(dtype=x.dtype)
        y = F.conv3d(x, f, stride=s, padding=self.pad, groups=self.channels)
        for axis in (2, 3, 4):
            for first, last in self._edge_outputs(x.shape[axis], y.shape[axis], s):
                y.narrow(axis, first, last - first).copy_(self._replicate_padded(x, f, axis, first, last, s))
        return y

    def _edge_outputs(self, n: int, m: int, s: int) -> list[tuple[int, int]]:
        """[first, last) output ranges along an axis of n inputs / m outputs whose window leaves the input."""
        p = self.pad
        low = min(m, -(-p // s))  # outputs i with s·i − p < 0
        high = max(low, (n - 1 - p) // s + 1)  # first output with s·i + p > n − 1 (not below ``low``)
        return [r for r in ((0, low), (high, m)) if r[0] < r[1]]

    def _replicate_padded(self, x: torch.Tensor, f: torch.Tensor, axis: int, first: int, last: int,
                          s: int) -> torch.Tensor:
        """Outputs [first, last) along ``axis`` of the replicate-padded blur, from the input slab they see."""
        p, n = self.pad, x.shape[axis]
        lo, hi = s * first - p, s * (last - 1) + p + 1
        slab = x.narrow(axis, max(0, lo), min(n, hi) - max(0, lo))
        pads = [p] * 6  # (x low, x high, y low, y high, z low, z high)
        pads[2 * (4 - axis)], pads[2 * (4 - axis) + 1] = max(0, -lo), max(0, hi - n)
        return F.conv3d(F.pad(slab, tuple(pads), mode="replicate"), f, stride=s, groups=self.channels)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, stride={self.stride}, kernel=[1,4,6,4,1]^3/4096, padding=replicate"


def clip_descriptor_norm(y: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Divide each descriptor vector (along ``dim``) by max(1, its L2 norm)."""
    return y / torch.linalg.vector_norm(y, dim=dim, keepdim=True).clamp_min(1.0)


class DISANet(nn.Module):
    """The DISA-LC² descriptor CNN: [B, 1, D, H, W] → [B, 16, ceil(D/4), ceil(H/4), ceil(W/4)].

    Layer indices (and so ``state_dict`` keys, e.g. ``layers.0.0.weight``,
    ``layers.1.layers.0.0.weight``, ``layers.8.weight``) follow the published network's
    ``layers`` sequence.  Output vectors have L2 norm ≤ 1.  ``forward(x, output_stride=2)`` gives
    the à trous map, ceil(n/2) per axis (module docstring).
    """

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            _conv_act(1, 8),                # 0
            ResidualBlock(8),               # 1
            _conv_act(8, 16),               # 2
            BlurPool3d(16),                 # 3
            ResidualBlock(16),              # 4
            _conv_act(16, 32),              # 5
            BlurPool3d(32),                 # 6
            ResidualBlock(32),              # 7
            nn.Conv3d(32, DESCRIPTOR_CHANNELS, kernel_size=1, bias=False),  # 8
        )

    def forward(self, x: torch.Tensor, output_stride: int = OUTPUT_STRIDE) -> torch.Tensor:
        if x.dim() != 5 or x.size(1) != 1:
            raise InvalidParameterError(f"DISANet expects a [B, 1, D, H, W] tensor, got shape {tuple(x.shape)}")
        _check_output_stride(output_stride)
        h = self.layers[0](x)
        if h.device.type == "cpu":
            # Why: from 8 channels on, the CPU convolutions run 1.5x faster on channels-last tensors
            # (a 128x128x104 pass, 2 threads: 0.73 s -> 0.48 s, same values to 3e-7).  The one-channel
            # input has no channels-last layout, so the switch comes after the first layer.
            h = h.contiguous(memory_format=torch.channels_last_3d)
        if output_stride == OUTPUT_STRIDE:
            for layer in self.layers[1:]:
                h = layer(h)
        else:  # à trous: layers 1-5 as trained, the second blur-pool at stride 1, block 7 dilated by 2
            for layer in self.layers[1:6]:
                h = layer(h)
            h = self.layers[7].dilated(self.layers[6](h, stride=1), dilation=2)
            h = self.layers[8](h)
        # the norm and the division in float32 whatever precision the layers ran in (bfloat16: see
        # compute_descriptors), so every descriptor's norm is ≤ 1 to float32 rounding
        return clip_descriptor_norm(h.float(), dim=1)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; buffers such as the blur kernels are not counted."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------- geometry
def _check_output_stride(output_stride: int) -> None:
    if output_stride not in OUTPUT_STRIDES:
        raise InvalidParameterError(f"the DISA network's output stride must be one of {OUTPUT_STRIDES}, "
                                    f"got {output_stride!r}")


def descriptor_shape(shape: Iterable[int], output_stride: int = OUTPUT_STRIDE) -> tuple[int, ...]:
    """Shape of the descriptor grid for an input grid ``shape``: ceil(n / stride) per axis."""
    return tuple(-(-int(n) // output_stride) for n in shape)


def descriptor_geometry(input_geometry: ImageGeometry, output_stride: int = OUTPUT_STRIDE) -> ImageGeometry:
    """The physical grid of the descriptor map of a volume on ``input_geometry``.

    Descriptor voxel (k, j, i) is centred on input voxel (4k, 4j, 4i) (s = ``output_stride``: s·k, …),
    so the grid keeps the input's origin and direction, multiplies the spacing by s and has
    ceil(n / s) voxels per axis.  The last descriptor along an axis lies on input index
    s·(ceil(n/s) − 1) ≤ n − 1, i.e. always on an input voxel centre, never beyond the input.
    """
    return ImageGeometry(
        shape=descriptor_shape(input_geometry.shape, output_stride),
        spacing=tuple(s * output_stride for s in input_geometry.spacing),
        origin=input_geometry.origin,
        direction=input_geometry.direction,
    )


# ---------------------------------------------------------------------------------- small volumes
def _check_min_size(shape: Iterable[int]) -> None:
    shape = tuple(int(s) for s in shape)
    if min(shape) < MIN_AXIS_SIZE:
        raise InvalidImageError(
            f"the volume has only {min(shape)} voxels along one axis (shape z,y,x = {shape}); DISA "
            f"descriptors need at least {MIN_AXIS_SIZE} voxels along every axis of a 3D volume (resample "
            "it to a finer spacing, or use a thicker crop)")


def receptive_field_padding(shape: Iterable[int]) -> list[tuple[int, int]]:
    """Replicate padding (low, high) per spatial axis that :func:`pad_to_receptive_field` applies.

    An axis shorter than RECEPTIVE_FIELD is padded to exactly RECEPTIVE_FIELD voxels; the low-side
    padding is a multiple of OUTPUT_STRIDE (about half of the total) so the descriptor grid of the
    original voxels stays aligned: crop ``low // 4`` descriptors at the start.
    """
    pads = []
    for n in shape:
        total = max(0, RECEPTIVE_FIELD - int(n))
        low = OUTPUT_STRIDE * (total // (2 * OUTPUT_STRIDE))
        pads.append((low, total - low))
    return pads


def pad_to_receptive_field(tensor: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Pad a [B, C, D, H, W] tensor (replicate) so every spatial axis is ≥ RECEPTIVE_FIELD voxels.

    Returns the padded tensor and the (low, high) padding per axis (z, y, x).  Axes already
    ≥ RECEPTIVE_FIELD are untouched (so a large volume is returned as is); an axis shorter than
    MIN_AXIS_SIZE is refused with :class:`InvalidImageError`.  No warning is emitted: padding small
    volumes is the documented behaviour.  Descriptors of the original voxels are the padded
    result cropped by ``low // 4`` at the start and to ``ceil(n / 4)`` entries per axis
    (:func:`compute_descriptors` does this).
    """
    if tensor.dim() != 5:
        raise InvalidParameterError(f"expected a [B, C, D, H, W] tensor, got shape {tuple(tensor.shape)}")
    _check_min_size(tensor.shape[2:])
    pads = receptive_field_padding(tensor.shape[2:])
    if any(lo or hi for lo, hi in pads):
        (zl, zh), (yl, yh), (xl, xh) = pads
        tensor = F.pad(tensor, (xl, xh, yl, yh, zl, zh), mode="replicate")
    return tensor, pads


# ---------------------------------------------------------------------------------- inference
def _run_slabs(model: nn.Module, x: torch.Tensor, chunk: int, output_stride: int = OUTPUT_STRIDE) -> torch.Tensor:
    """Descriptors of [B, 1, D, H, W] computed in z-slabs; equal to one pass.

    Each slab produces the descriptor slices [k0, k1) from the input slices
    [s·k0 − SLAB_HALO, s·(k1 − 1) + SLAB_HALO] (s the output stride; clipped to the volume).  Every
    slab starts on a multiple of s, so its grid is aligned with the full one (the à trous map is
    shift-equivariant in steps of s), and every descriptor it keeps sees its whole receptive field
    inside the slab (or the true volume border, treated the same way).
    """
    s = output_stride
    depth = x.size(2)
    out_depth = descriptor_shape([depth], s)[0]
    per_slab = max(1, -(-int(chunk) // s))  # descriptor slices per slab
    pieces = []
    for k0 in range(0, out_depth, per_slab):
        k1 = min(out_depth, k0 + per_slab)
        z0 = max(0, s * k0 - SLAB_HALO)
        z1 = min(depth, s * (k1 - 1) + SLAB_HALO + 1)
        y = _network(model, x[:, :, z0:z1], s)
        first = (s * k0 - z0) // s
        pieces.append(y[:, :, first:first + (k1 - k0)])
    return torch.cat(pieces, dim=2)


def _network(model: nn.Module, x: torch.Tensor, output_stride: int) -> torch.Tensor:
    """``model(x)``, passing the output stride only when it is not the trained one (so a plain module
    standing in for the network, as tests use, still works at stride 4)."""
    return model(x) if output_stride == OUTPUT_STRIDE else model(x, output_stride=output_stride)


def _forward(model: nn.Module, x: torch.Tensor, chunk: int | None, output_stride: int = OUTPUT_STRIDE) -> torch.Tensor:
    if chunk is None or chunk >= x.size(2):
        return _network(model, x, output_stride)
    return _run_slabs(model, x, chunk, output_stride)


def sign_symmetric_mean(forward, x: torch.Tensor) -> torch.Tensor:
    """½(forward(x) + forward(−x)): descriptors that ignore the sign of the image, as LC² does (see
    :func:`compute_descriptors`); training (``train disa --sign-symmetric``) uses the same helper.

    Both signs run as one batch: on the CPU one pass of two volumes took 4–21% less time than two
    passes of one (a 105×133×180 volume on an idle 2-core machine, 1 and 2 threads; the one-channel
    first convolution is poorly vectorised at batch size 1; docs/benchmarks.md, "Chest-CT time with the
    batched sign-symmetric passes"), for twice the activation memory of one pass."""
    n = x.shape[0]
    y = forward(torch.cat([x, -x]))
    return 0.5 * (y[:n] + y[n:])


def compute_descriptors(model: nn.Module, volume: Volume, device: str | torch.device = "auto",
                        chunk: int | None = None, sign_symmetric: bool = False,
                        output_stride: int = OUTPUT_STRIDE,
                        precision: str = "float32") -> tuple[torch.Tensor, ImageGeometry]:
    """DISA descriptors of ``volume``: a [16, d, h, w] float32 tensor and its physical grid.

    * ``output_stride``: 4, the network as trained (descriptors every 4 input voxels), or 2, the
      à trous map (every 2 voxels, 8× the sites; module docstring).  Only the layers after the
      second blur-pool run at the finer density: on the Kirby21 pair (fixed and moving, sign-symmetric,
      2 threads) 3.4–6.1 s against 3.1–3.4 s at stride 4 (docs/disa_dense_deformable_t2_2026-12-06b.json).

    * ``sign_symmetric``: return ½(φ(x) + φ(−x)), the mean of the descriptors of the volume and of
      its negative (two forward passes).  Why: LC², the target, does not change when either image's
      sign flips, and training only asks the network for that through random sign augmentation, so
      φ(x) and φ(−x) differ; averaging makes the invariance exact.  Norms stay ≤ 1.  Registration
      uses it (its optimum moves closer to the truth, docs/benchmarks.md "optimum bias"); the
      plain network output is what was trained against LC² and what the descriptor benchmark scores.

    * The caller normalises intensities (the network was trained on zero-mean, unit-variance
      volumes resampled to 2 mm); this function does not touch them, and never modifies the input.
    * Runs under ``torch.no_grad`` on ``resolve_device(device)``; the model is moved there.  The
      descriptors are returned on the device they were computed on.
    * ``chunk``: if given, process the volume in z-slabs of about ``chunk`` input slices (plus a
      halo of SLAB_HALO slices on each side) to bound memory; the result equals a single pass.
    * Axes shorter than RECEPTIVE_FIELD are replicate-padded (:func:`pad_to_receptive_field`) and
      the result is cropped back, so the grid is always :func:`descriptor_geometry` of the volume;
      axes shorter than MIN_AXIS_SIZE are refused with :class:`InvalidImageError`.
    * A wide constant border (padding around the anatomy) is not run through the network: its
      descriptors are all the same vector (:mod:`.disa_border`).  The result equals a full pass except
      within half a receptive field of the volume's own edge, where a full pass bends under zero padding.
    * ``precision``: "float32" (default), or "bfloat16": the convolutions run in bfloat16 (torch's
      autocast; activations rounded to 8 significant bits), the norm clipping and the result in float32.
      On a CPU with native bfloat16 arithmetic (AVX512-BF16 or AMX, :func:`~..device.native_bfloat16`)
      a pass takes about half the time (the chest CT at 2 mm, both signs, 2 threads: 2.59 → 1.37 s), and
      the sign-symmetric maps of the chest CT and Kirby21 T1/T2 differ from float32 by 1.0–1.5% of their
      norm (benchmarks/kernel_speedups.py --only disa_bfloat16; docs/benchmarks.md, "DISA in bfloat16").  On other CPUs
      bfloat16 is emulated and slower: the registration engine asks for it only where it is native
      (``disa_precision="auto"``).
    * A CUDA out-of-memory error retries in slabs of 64 slices, then on the CPU, with a warning.
    """
    if not isinstance(volume, Volume):
        raise InvalidParameterError("compute_descriptors needs a Volume (data with its geometry)")
    if chunk is not None and int(chunk) < 1:
        raise InvalidParameterError(f"chunk must be a positive number of slices, got {chunk}")
    _check_output_stride(output_stride)
    if precision not in PRECISIONS:
        raise InvalidParameterError(f"the DISA network's precision must be one of {PRECISIONS}, got {precision!r}")
    shape = volume.geometry.shape
    _check_min_size(shape)
    data = volume.data
    if data.is_floating_point() and not bool(torch.isfinite(data).all()):
        raise InvalidImageError(
            f"the volume{' ' + repr(volume.name) if volume.name else ''} has NaN or Inf voxels; replace them "
            "before computing DISA descriptors")
    target = resolve_device(device)
    geometry = descriptor_geometry(volume.geometry, output_stride)
    from .disa_border import forward_skipping_constant_border

    def run(dev: torch.device, slabs: int | None) -> torch.Tensor:
        model.to(dev)
        x = data.to(device=dev, dtype=torch.float32)[None, None]
        x, pads = pad_to_receptive_field(x)
        def forward(v: torch.Tensor) -> torch.Tensor:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                return forward_skipping_constant_border(lambda u: _forward(model, u, slabs, output_stride), v,
                                                        output_stride)

        y = (sign_symmetric_mean(forward, x) if sign_symmetric else forward(x))[0]
        starts = [lo // output_stride for lo, _ in pads]
        (d, h, w) = geometry.shape
        return y[:, starts[0]:starts[0] + d, starts[1]:starts[1] + h, starts[2]:starts[2] + w].contiguous()

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                out = run(target, chunk)
            except torch.cuda.OutOfMemoryError:
                if target.type != "cuda":
                    raise
                torch.cuda.empty_cache()
                slabs = 64 if chunk is None else max(OUTPUT_STRIDE, int(chunk) // 2)
                warnings.warn(f"GPU out of memory computing DISA descriptors of a {shape} volume; "
                              f"retrying in z-slabs of {slabs} slices", RuntimeWarning, stacklevel=2)
                try:
                    out = run(target, slabs)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    warnings.warn("GPU still out of memory; computing DISA descriptors on the CPU (slower)",
                                  RuntimeWarning, stacklevel=2)
                    out = run(torch.device("cpu"), slabs)
    finally:
        model.train(was_training)
    return out, geometry


# ---------------------------------------------------------------------------------- weights
def _adapt_state_dict(state: dict) -> dict:
    """Accept checkpoints saved from ``torch.compile``d models and ones holding the blur kernels."""
    from ..weights.manifest import WeightsError

    out = {}
    for key, value in state.items():
        if key.startswith("_orig_mod."):
            key = key[len("_orig_mod."):]
        out[key] = value
    for idx, ch in (("3", 16), ("6", 32)):
        key = f"layers.{idx}.f"
        if key in out:
            kernel = out.pop(key)
            if not (isinstance(kernel, torch.Tensor) and kernel.shape == (ch, 1, 5, 5, 5)
                    and torch.allclose(kernel.float().cpu(), binomial_kernel_3d(ch), atol=1e-6)):
                raise WeightsError(f"the checkpoint's blur kernel {key} is not the fixed [1,4,6,4,1]^3 kernel")
    return out


def _manifest_entry(name: str):
    from ..weights import manifest

    for entry in manifest.load_manifest(manifest.MANIFEST):
        if entry.name == name:
            return entry
    return None


def load_disa_network(name: str = "disa", device: str | torch.device = "cpu") -> DISANet:
    """Build :class:`DISANet` and load the shipped weights ``name`` (SHA-256 verified, weights_only).

    Raises :class:`~DeepMultimodalRegLib.weights.manifest.WeightsError` when the manifest has no such
    network, when the file is missing or corrupt (the message names the file), or when the file
    does not fit the architecture.  The model is returned in eval mode on ``device``.
    """
    from ..weights import manifest

    WeightsError = manifest.WeightsError
    entry = _manifest_entry(name)
    if entry is None:
        raise WeightsError(
            f"no DISA weights named {name!r} are shipped with this version of DeepMultimodalReg (the "
            "weights manifest has no such entry); train them with the DISA recipe (`deepmmreg train "
            "disa`) or install a release that includes them")
    try:
        state = manifest.load_state_dict(name, map_location="cpu")
    except WeightsError as exc:
        raise WeightsError(f"cannot load the DISA network {name!r} from {entry.path}: {exc}") from exc
    except Exception as exc:  # hash matched but the file is not a plain state_dict (pickle/zip error)
        raise WeightsError(f"cannot load the DISA network {name!r}: {entry.path} is not a valid "
                           f"weights file ({type(exc).__name__}: {exc})") from exc
    model = DISANet()
    try:
        model.load_state_dict(_adapt_state_dict(state), strict=True)
    except WeightsError as exc:
        raise WeightsError(f"{exc} [file: {entry.path}]") from exc
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise WeightsError(f"the weights in {entry.path} do not fit the DISA network: {exc}") from exc
    device = resolve_device(device)
    if device.type == "cpu":
        # Why: with the weights channels-last too (the activations are from layer 1 on, see forward),
        # the CPU convolutions skip a layout conversion per call: a sign pair of passes over the chest
        # CT's 105x133x180 grid, 2 threads, 2.59 -> 2.25 s (ad hoc), same values to 1e-7.
        model = model.to(memory_format=torch.channels_last_3d)
    return model.to(device).eval()


def receptive_field_of(layers: Iterable[tuple[int, int]]) -> int:
    """Receptive field of a chain of (kernel, stride) layers (used to check RECEPTIVE_FIELD)."""
    rf, jump = 1, 1
    for kernel, stride in layers:
        rf += (kernel - 1) * jump
        jump *= stride
    return rf


#: (kernel, stride) of every spatial operation in DISANet, in order (conv1, res8 ×2, conv2, blur,
#: res16 ×2, conv3, blur, res32 ×2, 1×1 conv).
LAYER_KERNELS = ([(3, 1)] * 4 + [(5, 2)] + [(3, 1)] * 3 + [(5, 2)] + [(3, 1)] * 2 + [(1, 1)])
