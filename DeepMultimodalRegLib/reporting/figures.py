"""``report.png``: before/after figures a person can judge a registration by.

Three orthogonal planes through the centre of the fixed image (axial, coronal, sagittal; one plane
for a single-slice image) are shown in the radiological convention — the patient's right on the
image's left, anterior at the top of axial planes, superior at the top of coronal and sagittal
planes, anterior on the left of sagittal planes — with physical (mm) aspect ratios taken from the
voxel spacing, whatever the voxel order or direction matrix of the file.  Each plane appears
*before* (the moving image resampled onto the fixed grid with the identity transform, i.e. how the
two scans overlap as acquired) and *after* (the warped moving image) as

* a colour overlay: fixed in green, moving in magenta, each scaled by its own 1st–99th percentile
  (where both are bright the overlay is white/grey),
* a checkerboard of fixed and moving squares (edges should run on across the squares),
* the absolute difference of the two scaled images (on one 0–1 scale for before and after).

matplotlib is imported inside the functions, through its Agg (file) backend only, so importing the
library never opens or needs a display.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..fileio import atomic_output, check_output_path

__all__ = ["PLANES", "normalise_for_display", "display_limits", "checkerboard", "middle_slices",
           "overlay_composite", "report_panels", "write_report_png", "planes_through", "plane_pixel_position",
           "draw_plane"]

#: the anatomical planes, in display order
PLANES = ("axial", "coronal", "sagittal")
#: physical LPS axis (0 = x/L, 1 = y/P, 2 = z/S) normal to each plane
_NORMAL_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
#: patient direction at the (left, right, top, bottom) edge of each plane as displayed
EDGE_LABELS = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}

#: figure width in inches at :data:`DPI` → 1600 pixels
FIGURE_WIDTH_IN = 16.0
DPI = 100


# ---------------------------------------------------------------------------- intensity helpers
def _as_numpy(array) -> np.ndarray:
    """A float32 numpy copy/view of a numpy array, a torch tensor (any device) or a Volume."""
    data = getattr(array, "data", array) if not isinstance(array, np.ndarray) else array
    if hasattr(data, "detach"):
        data = data.detach().cpu().float().numpy()
    return np.asarray(data, dtype=np.float32)


def display_limits(array, low: float = 1.0, high: float = 99.0, max_samples: int = 1_000_000) -> tuple[float, float]:
    """The ``low``/``high`` percentiles of the finite values (evenly subsampled on large images).

    Falls back to the minimum/maximum when the percentiles coincide (e.g. a small mask on a zero
    background); a constant or empty image gives ``(v, v)``.
    """
    values = _as_numpy(array).reshape(-1)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 0.0
    if values.size > max_samples:
        values = values[:: values.size // max_samples + 1]
    lo, hi = (float(v) for v in np.percentile(values, [low, high]))
    if not hi > lo:
        lo, hi = float(values.min()), float(values.max())
    return lo, hi


def normalise_for_display(array, low: float = 1.0, high: float = 99.0,
                          limits: tuple[float, float] | None = None) -> np.ndarray:
    """Map the ``low``/``high`` percentiles (or the given ``limits``) to 0/1, clipped; float32.

    NaN/Inf map to 0; a constant image maps to all zeros (no division by zero).
    """
    data = _as_numpy(array)
    lo, hi = display_limits(data, low, high) if limits is None else (float(limits[0]), float(limits[1]))
    if not (math.isfinite(lo) and math.isfinite(hi)) or not hi > lo:
        return np.zeros(data.shape, dtype=np.float32)
    out = (np.where(np.isfinite(data), data, lo) - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def checkerboard(a, b, squares: int = 8, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Alternate ``a`` and ``b`` in squares, ``squares`` of them across the image's longest side.

    The square at the first pixel shows ``a``.  ``spacing`` (the pixel size along each array axis,
    in the array's axis order) makes the squares square in millimetres on anisotropic pixels.
    """
    a, b = _as_numpy(a), _as_numpy(b)
    if a.shape != b.shape:
        raise ValueError(f"checkerboard needs two images of one shape, got {a.shape} and {b.shape}")
    if squares < 1:
        raise ValueError(f"squares must be at least 1, got {squares}")
    shape = np.asarray(a.shape, dtype=np.float64)
    pixel = np.ones(a.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64).reshape(-1)
    if pixel.size != a.ndim or np.any(pixel <= 0):
        raise ValueError(f"spacing must have one positive value per axis ({a.ndim}), got {spacing}")
    side_mm = float((shape * pixel).max()) / squares
    parity = np.zeros(a.shape, dtype=np.int64)
    for axis, (n, p) in enumerate(zip(a.shape, pixel)):
        block = max(1, int(round(side_mm / p)))
        index_shape = [1] * a.ndim
        index_shape[axis] = n
        parity = parity + (np.arange(n) // block).reshape(index_shape)
    return np.where(parity % 2 == 0, a, b)


def overlay_composite(fixed, moving) -> np.ndarray:
    """An RGB image (H, W, 3): fixed (0–1) in green, moving (0–1) in magenta; equal → grey."""
    f = np.clip(_as_numpy(fixed), 0, 1)
    m = np.clip(_as_numpy(moving), 0, 1)
    return np.stack([m, f, m], axis=-1)


# ---------------------------------------------------------------------------- geometry helpers
def _axis_assignment(direction) -> tuple[list[int], list[int], bool]:
    """For each index axis (i, j, k): the nearest physical LPS axis, its sign, and whether oblique."""
    m = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    perm, used = [-1, -1, -1], set()
    for _, p, a in sorted(((abs(m[p, a]), p, a) for p in range(3) for a in range(3)), reverse=True):
        if perm[a] < 0 and p not in used:
            perm[a] = p
            used.add(p)
    signs = [1 if m[perm[a], a] >= 0 else -1 for a in range(3)]
    oblique = any(abs(abs(m[perm[a], a]) - 1.0) > 1e-3 for a in range(3))
    return perm, signs, oblique


def _canonical(array: np.ndarray, geometry) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A (z, y, x) array of ``geometry`` reordered to axes (S, P, L) increasing; spacing (L, P, S)."""
    perm, signs, _ = _axis_assignment(geometry.direction)
    source = [0, 0, 0]
    spacing = [0.0, 0.0, 0.0]
    for a in range(3):  # index axis a is array dim 2-a; physical axis p goes to dim 2-p
        source[2 - perm[a]] = 2 - a
        spacing[perm[a]] = geometry.spacing[a]
    out = np.transpose(array, source)
    for a in range(3):
        if signs[a] < 0:
            out = np.flip(out, axis=2 - perm[a])
    return out, tuple(spacing)  # type: ignore[return-value]


def _display_plane(slab: np.ndarray, geometry, plane: str) -> np.ndarray:
    """A one-voxel-thick slab (z, y, x) → the plane's 2D display array (radiological)."""
    can, _ = _canonical(slab, geometry)
    if plane == "axial":       # rows P (anterior on top), columns L (patient right on the left)
        return np.ascontiguousarray(can[0])
    if plane == "coronal":     # rows S flipped (superior on top), columns L
        return np.ascontiguousarray(can[:, 0, :][::-1])
    return np.ascontiguousarray(can[:, :, 0][::-1])  # sagittal: rows S flipped, columns P (anterior left)


def plane_pixel_mm(geometry, plane: str) -> tuple[float, float]:
    """Pixel size (column width, row height) in mm of a displayed plane."""
    _, spacing = _canonical(np.zeros((1, 1, 1), dtype=np.float32), geometry)
    sl, sp, ss = spacing
    return {"axial": (sl, sp), "coronal": (sl, ss), "sagittal": (sp, ss)}[plane]


def _plane_indices(geometry) -> dict[str, tuple[int, int]]:
    """For each displayed plane: (index axis a of the grid normal to it, slice index along a).

    A single-slice (2D) grid gives only the plane of its slice.
    """
    perm, _, _ = _axis_assignment(geometry.direction)
    size = geometry.size_xyz
    planes = {}
    for plane in PLANES:
        a = perm.index(_NORMAL_AXIS[plane])
        planes[plane] = (a, size[a] // 2)
    if geometry.is_2d():
        thin = [a for a in range(3) if size[a] == 1]
        planes = {p: v for p, v in planes.items() if v[0] == thin[0]}
    return planes


def _slab_geometry(geometry, axis: int, index: int):
    """The one-voxel-thick sub-grid of ``geometry`` at ``index`` along index axis ``axis``."""
    from ..image.geometry import ImageGeometry

    shape = list(geometry.shape)
    shape[2 - axis] = 1
    origin = (np.asarray(geometry.origin) + geometry.direction_matrix[:, axis] * geometry.spacing[axis] * index)
    return ImageGeometry(shape=tuple(shape), spacing=geometry.spacing, origin=tuple(origin),
                         direction=geometry.direction)


def middle_slices(volume) -> dict[str, np.ndarray]:
    """The volume's planes through its centre as display-ready 2D float arrays, by plane name.

    Radiological orientation (see the module docstring); pixel sizes from :func:`plane_pixel_mm`.
    A single-slice volume gives one plane.
    """
    data = _as_numpy(volume)
    out = {}
    for plane, (axis, index) in _plane_indices(volume.geometry).items():
        slab = np.take(data, [index], axis=2 - axis)
        out[plane] = _display_plane(slab, volume.geometry, plane)
    return out


def _voxel_planes(geometry, voxel) -> dict[str, tuple[int, int]]:
    """For each displayed plane: (index axis normal to it, the voxel's index along that axis)."""
    k, j, i = (int(v) for v in voxel)
    index_xyz = (i, j, k)
    size = geometry.size_xyz
    if any(not 0 <= v < n for v, n in zip(index_xyz, size)):
        raise ValueError(f"voxel (k, j, i) = {(k, j, i)} is outside the grid of shape (z, y, x) = {geometry.shape}")
    return {plane: (axis, index_xyz[axis]) for plane, (axis, _) in _plane_indices(geometry).items()}


def planes_through(volume, voxel) -> dict[str, np.ndarray]:
    """Like :func:`middle_slices`, but the planes pass through ``voxel`` (k, j, i) instead of the centre.

    Display-ready 2D float arrays by plane name, radiological orientation; a single-slice volume
    gives its one plane.  :func:`plane_pixel_position` says where ``voxel`` lands in each of them.
    """
    data = _as_numpy(volume)
    return {plane: _display_plane(np.take(data, [index], axis=2 - axis), volume.geometry, plane)
            for plane, (axis, index) in _voxel_planes(volume.geometry, voxel).items()}


def plane_pixel_position(geometry, voxel, plane: str) -> tuple[float, float]:
    """(column, row) of voxel (k, j, i) — integer or continuous — in ``plane`` as displayed.

    The inverse of the reordering and flips :func:`middle_slices` / :func:`planes_through` apply:
    in a panel drawn by :func:`draw_plane` the voxel's centre is at
    ``((column + 0.5) · pixel_mm[0], (row + 0.5) · pixel_mm[1])`` in the axes' mm coordinates.
    """
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    perm, signs, _ = _axis_assignment(geometry.direction)
    index_xyz = (float(voxel[2]), float(voxel[1]), float(voxel[0]))
    size = geometry.size_xyz
    canon = [0.0, 0.0, 0.0]   # position along physical L, P, S in the canonical (increasing) array
    extent = [1, 1, 1]
    for a in range(3):
        p = perm[a]
        canon[p] = index_xyz[a] if signs[a] > 0 else size[a] - 1 - index_xyz[a]
        extent[p] = size[a]
    lat, post, sup = canon
    flipped_sup = extent[2] - 1 - sup
    return {"axial": (lat, post), "coronal": (lat, flipped_sup), "sagittal": (post, flipped_sup)}[plane]


def draw_plane(ax, image, plane: str, pixel_mm, **kwargs) -> None:
    """Draw a displayed plane in ``ax`` as the report figure does: physical aspect, no ticks, the
    patient-direction letters (``letters=False`` to leave them out); axes coordinates are mm from
    the panel's top-left corner.  Keyword arguments: cmap, vmin, vmax, letters, corner_text,
    scale_bar."""
    _draw_panel(ax, image, plane, pixel_mm, **kwargs)


def _slices_on_fixed_grid(volume, fixed_geometry, default_value: float) -> dict[str, np.ndarray]:
    """``volume`` resampled (identity transform, physical space) onto the fixed grid's planes."""
    from ..transforms import AffineTransform, warp_volume

    if volume.geometry.same_grid(fixed_geometry):
        data = _as_numpy(volume)
        return {plane: _display_plane(np.take(data, [index], axis=2 - axis), fixed_geometry, plane)
                for plane, (axis, index) in _plane_indices(fixed_geometry).items()}
    identity = AffineTransform.identity(center=tuple(fixed_geometry.center), device=volume.data.device)
    out = {}
    for plane, (axis, index) in _plane_indices(fixed_geometry).items():
        slab = warp_volume(volume, identity, _slab_geometry(fixed_geometry, axis, index),
                           default_value=default_value)
        out[plane] = _display_plane(_as_numpy(slab), fixed_geometry, plane)
    return out


# ---------------------------------------------------------------------------- panels
@dataclass
class ReportPanels:
    """Everything the report figure shows, as arrays (also handy for tests and other front ends)."""

    planes: list[str]
    pixel_mm: dict[str, tuple[float, float]]
    is_2d: bool
    oblique: bool
    fixed: dict[str, np.ndarray]          # normalised 0–1
    before: dict[str, np.ndarray]         # moving on the fixed grid, identity transform, normalised
    after: dict[str, np.ndarray]          # warped moving, normalised
    squares: int = 8

    def overlay(self, stage: str, plane: str) -> np.ndarray:
        return overlay_composite(self.fixed[plane], getattr(self, stage)[plane])

    def checker(self, stage: str, plane: str) -> np.ndarray:
        col, row = self.pixel_mm[plane]
        return checkerboard(self.fixed[plane], getattr(self, stage)[plane], self.squares, spacing=(row, col))

    def difference(self, stage: str, plane: str) -> np.ndarray:
        return np.abs(self.fixed[plane] - getattr(self, stage)[plane])


def report_panels(fixed, moving, warped, squares: int = 8) -> ReportPanels:
    """Normalised fixed / before / after planes of a registration (see :func:`write_report_png`)."""
    geometry = fixed.geometry
    planes = list(_plane_indices(geometry))
    _, _, oblique = _axis_assignment(geometry.direction)
    moving_limits = display_limits(moving.data)
    warped_limits = display_limits(warped.data)
    fixed_limits = display_limits(fixed.data)
    # pad outside the moving image's field of view with its display minimum (→ black)
    before_raw = _slices_on_fixed_grid(moving, geometry, default_value=moving_limits[0])
    after_raw = _slices_on_fixed_grid(warped, geometry, default_value=warped_limits[0])
    return ReportPanels(
        planes=planes,
        pixel_mm={p: plane_pixel_mm(geometry, p) for p in planes},
        is_2d=geometry.is_2d(),
        oblique=oblique,
        fixed={p: normalise_for_display(a, limits=fixed_limits) for p, a in middle_slices(fixed).items()},
        before={p: normalise_for_display(a, limits=moving_limits) for p, a in before_raw.items()},
        after={p: normalise_for_display(a, limits=warped_limits) for p, a in after_raw.items()},
        squares=squares,
    )


# ---------------------------------------------------------------------------- figure
def _format_value(value: Any) -> str | None:
    """A short display string for a figures entry, or None to leave it out (nested/large values)."""
    if isinstance(value, Mapping):
        return None
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu()
        if value.numel() > 6:
            return None
        value = value.tolist()
    if isinstance(value, np.ndarray):
        if value.size > 6:
            return None
        value = value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        if len(value) > 6 or any(isinstance(v, (Mapping, list, tuple)) for v in value):
            return None
        parts = [_format_value(v) for v in value]
        return "(" + ", ".join(p for p in parts if p is not None) + ")"
    text = str(value)
    return text if len(text) <= 160 else text[:159] + "…"


def _info_lines(figures: Mapping[str, Any] | None) -> list[str]:
    lines = []
    for key, value in (figures or {}).items():
        text = _format_value(value)
        if text is not None:
            lines.append(f"{str(key).replace('_', ' ')}: {text}")
    return lines


#: width of one character of the 9-point monospace info text, in inches (DejaVu Sans Mono: 0.6 em, with a margin)
_MONO_CHAR_IN = 0.64 * 9 / 72


def _layout_info(lines: list[str], n_cols: int, chars_per_col: int) -> tuple[list[tuple[int, int, str]], int]:
    """Place info lines in a grid of ``n_cols`` columns; a long line spans several (truncated to the row)."""
    cells, row, col = [], 0, 0
    for line in lines:
        span = min(n_cols, max(1, math.ceil((len(line) + 2) / (chars_per_col + 2))))
        if col + span > n_cols:
            row, col = row + 1, 0
        room = span * chars_per_col + (span - 1) * 2
        cells.append((row, col, line if len(line) <= room else line[: room - 1] + "…"))
        col += span
    return cells, (row + 1 if lines else 0)


def _volume_line(role: str, volume) -> str:
    g = volume.geometry
    size = "×".join(str(s) for s in g.size_xyz)
    spacing = "×".join(f"{s:.3g}" for s in g.spacing)
    name = volume.name or "(unnamed)"
    return f"{role}: {name}  {size} voxels, {spacing} mm"


def _nice_length(mm: float) -> float:
    """A round scale-bar length about a quarter of ``mm``."""
    target = mm / 4
    for n in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000):
        if n >= target * 0.7:
            return float(n)
    return float(10 ** round(math.log10(max(target, 1e-9))))


def _draw_panel(ax, image, plane: str, pixel_mm, *, cmap=None, vmin=None, vmax=None, letters=True,
                corner_text: str | None = None, scale_bar: bool = False):
    import matplotlib.patheffects as pe

    rows, cols = image.shape[:2]
    width, height = cols * pixel_mm[0], rows * pixel_mm[1]
    ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, extent=(0, width, height, 0), aspect="equal",
              interpolation="nearest" if max(rows, cols) > 400 else "bilinear")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    outline = [pe.withStroke(linewidth=2.2, foreground="black")]
    if letters:
        left, right, top, bottom = EDGE_LABELS[plane]
        style = dict(color="#ffd23f", fontsize=9, fontweight="bold", path_effects=outline)
        ax.text(0.015, 0.5, left, transform=ax.transAxes, ha="left", va="center", **style)
        ax.text(0.985, 0.5, right, transform=ax.transAxes, ha="right", va="center", **style)
        ax.text(0.5, 0.985, top, transform=ax.transAxes, ha="center", va="top", **style)
        ax.text(0.5, 0.015, bottom, transform=ax.transAxes, ha="center", va="bottom", **style)
    if corner_text:
        ax.text(0.02, 0.02, corner_text, transform=ax.transAxes, ha="left", va="bottom", color="white",
                fontsize=7.5, path_effects=outline)
    if scale_bar:
        length = _nice_length(width)
        x1 = width * 0.96
        y = height * 0.93
        ax.plot([x1 - length, x1], [y, y], color="white", linewidth=2.5, solid_capstyle="butt",
                path_effects=[pe.withStroke(linewidth=4, foreground="black")])
        ax.text(x1 - length / 2, y - height * 0.02, f"{length:g} mm", ha="center", va="bottom", color="white",
                fontsize=7.5, path_effects=outline)


def _build_figure(panels: ReportPanels, title: str, info: list[str], volumes_line: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kinds = ("overlay", "checker", "difference")
    kind_titles = {"overlay": "overlay\nfixed green · moving magenta",
                   "checker": "checkerboard\nfixed | moving squares",
                   "difference": "|fixed − moving|\n(scaled 0–1)"}
    stages = ("before", "after")
    stage_titles = {"before": "BEFORE — moving as acquired (identity transform) on the fixed grid",
                    "after": "AFTER — registered moving (warped) on the fixed grid"}
    extents = {p: (panels.fixed[p].shape[1] * panels.pixel_mm[p][0], panels.fixed[p].shape[0] * panels.pixel_mm[p][1])
               for p in panels.planes}

    # cells: (row, column, kind, stage, plane)
    cells = []
    if panels.is_2d:          # one plane: rows before/after, columns overlay/checker/difference
        plane = panels.planes[0]
        col_mm = [extents[plane][0]] * 3
        row_mm = extents[plane][1]
        for r, stage in enumerate(stages):
            for c, kind in enumerate(kinds):
                cells.append((r, c, kind, stage, plane))
        row_labels = [stage.upper() for stage in stages]
        col_headers = [(c, c, kind_titles[k].replace("\n", " — ")) for c, k in enumerate(kinds)]
        group_gap_after = set()
    else:                     # rows overlay/checker/difference, columns before planes | after planes
        col_mm = [extents[p][0] for p in panels.planes] * 2
        row_mm = max(extents[p][1] for p in panels.planes)
        n = len(panels.planes)
        for r, kind in enumerate(kinds):
            for s, stage in enumerate(stages):
                for i, plane in enumerate(panels.planes):
                    cells.append((r, s * n + i, kind, stage, plane))
        row_labels = [kind_titles[k] for k in kinds]
        col_headers = [(0, n - 1, stage_titles["before"]), (n, 2 * n - 1, stage_titles["after"])]
        group_gap_after = {n - 1}
    nrows, ncols = max(c[0] for c in cells) + 1, len(col_mm)

    # layout in inches
    width = FIGURE_WIDTH_IN
    left, right, gap_x, group_gap, gap_y = 0.62, 0.62, 0.06, 0.32, 0.22
    header, col_header = 1.05, 0.42
    info_cols = 4
    info_col_w = (width - left - right) / info_cols
    info_cells, info_rows = _layout_info(info, info_cols, chars_per_col=int(info_col_w / _MONO_CHAR_IN) - 2)
    footer = 0.25 + 0.2 * info_rows + (0.2 if info else 0)
    usable = width - left - right - gap_x * (ncols - 1) - (group_gap - gap_x) * len(group_gap_after)
    scale = usable / sum(col_mm)                     # inches per mm, shared by every panel
    row_h = row_mm * scale
    height = header + col_header + nrows * row_h + (nrows - 1) * gap_y + footer

    fig = Figure(figsize=(width, height), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    fig.text(0.5, 1 - 0.18 / height, title or "Registration report", ha="center", va="top", fontsize=15,
             fontweight="bold")
    orientation = ("Radiological convention: patient's right on the image's left (letters mark patient "
                   "directions R/L, A/P, S/I); physical aspect ratio from voxel spacing")
    where = "the fixed image's single slice" if panels.is_2d else "planes through the fixed image's centre"
    if panels.oblique:
        where += " (oblique grid: shown on its nearest anatomical axes)"
    fig.text(0.5, 1 - 0.52 / height, f"{orientation}; {where}.", ha="center", va="top", fontsize=9.5,
             color="#333333")
    fig.text(0.5, 1 - 0.76 / height, volumes_line, ha="center", va="top", fontsize=9.5, color="#333333")

    x_of = []
    x = left
    for c in range(ncols):
        x_of.append(x)
        x += col_mm[c] * scale + (group_gap if c in group_gap_after else gap_x)
    top0 = header + col_header

    def box(r, c):
        y_top = top0 + r * (row_h + gap_y)
        return [x_of[c] / width, 1 - (y_top + row_h) / height, col_mm[c] * scale / width, row_h / height]

    for c0, c1, text in col_headers:
        x_mid = (x_of[c0] + x_of[c1] + col_mm[c1] * scale) / 2
        fig.text(x_mid / width, 1 - (header + 0.05) / height, text, ha="center", va="top", fontsize=11,
                 fontweight="bold", color="#1a1a1a")
    if not panels.is_2d:
        for c in range(ncols):
            plane = panels.planes[c % len(panels.planes)]
            fig.text((x_of[c] + col_mm[c] * scale / 2) / width, 1 - (header + 0.27) / height, plane,
                     ha="center", va="top", fontsize=10, color="#333333")
    for r, label in enumerate(row_labels):
        y_mid = top0 + r * (row_h + gap_y) + row_h / 2
        fig.text(0.33 / width, 1 - y_mid / height, label, ha="center", va="center", rotation=90, fontsize=9.5,
                 fontweight="bold", color="#1a1a1a", linespacing=1.4)

    diff_image = None
    for r, c, kind, stage, plane in cells:
        ax = fig.add_axes(box(r, c))
        ax.set_facecolor("black")
        pix = panels.pixel_mm[plane]
        first = c == 0 or (panels.is_2d and kind == "overlay")
        if kind == "overlay":
            _draw_panel(ax, panels.overlay(stage, plane), plane, pix, scale_bar=(c == 0 and r == 0))
        elif kind == "checker":
            _draw_panel(ax, panels.checker(stage, plane), plane, pix, cmap="gray", vmin=0, vmax=1)
        else:
            diff = panels.difference(stage, plane)
            _draw_panel(ax, diff, plane, pix, cmap="inferno", vmin=0, vmax=1,
                        corner_text=f"slice mean {float(diff.mean()):.3f}")
            diff_image = ax.images[0]
        if panels.is_2d and first:
            ax.set_title(panels.planes[0] + " slice", fontsize=8, color="#555555", loc="left", pad=2)

    if diff_image is not None:
        r = kinds.index("difference") if not panels.is_2d else 0
        b = box(r, ncols - 1)
        if panels.is_2d:
            b = [b[0], box(1, ncols - 1)[1], b[2], b[3] * 2 + gap_y / height]
        cax = fig.add_axes([(x_of[-1] + col_mm[-1] * scale + 0.12) / width, b[1] + b[3] * 0.1, 0.12 / width,
                            b[3] * 0.8 if not panels.is_2d else b[3] * 0.4])
        bar = fig.colorbar(diff_image, cax=cax)
        bar.ax.tick_params(labelsize=7)
        cax.set_title("|Δ|", fontsize=8, pad=4)

    if info:
        y0 = height - footer + 0.25
        fig.text(left / width, 1 - (y0 - 0.02) / height, "Figures", ha="left", va="bottom", fontsize=9.5,
                 fontweight="bold")
        for row, col, line in info_cells:
            fig.text((left + col * info_col_w) / width, 1 - (y0 + 0.05 + 0.2 * row) / height, line, ha="left",
                     va="top", fontsize=9, family="monospace", color="#1a1a1a")
    return fig


def write_report_png(fixed, moving, warped, path: str | os.PathLike, title: str = "",
                     figures: Mapping[str, Any] | None = None, squares: int = 8) -> Path:
    """Write the before/after registration figure (PNG, 1600 px wide) atomically; returns the path.

    ``fixed``, ``moving`` and ``warped`` are Volumes; ``warped`` is the moving image after
    registration, normally on the fixed grid (otherwise it is resampled onto it).  ``figures``'
    scalar entries (similarity before/after, seconds, device, iterations, ...) are listed under
    the images; nested dicts are left out.
    """
    out = check_output_path(path)
    panels = report_panels(fixed, moving, warped, squares=squares)
    volumes_line = _volume_line("fixed", fixed) + "     " + _volume_line("moving", moving)
    fig = _build_figure(panels, title, _info_lines(figures), volumes_line)
    with atomic_output(out) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, facecolor="white")
    return out
