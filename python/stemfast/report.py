"""Figures and the one-file HTML report of a batch run (matplotlib, Agg backend).

- :func:`plot_class_map` -- sites coloured by ``class_id`` over the image; the colour of a class id
  is fixed (:func:`class_color`), so class 0 has the same colour in every figure of every run.
- :func:`plot_defects` -- the top defect candidates circled and numbered over the image, next to
  a gallery of their patches.
- :func:`write_html_report` -- one self-contained HTML file (PNG figures embedded as base64, no
  external assets): per input its counts, lattice, timings and defect list; skipped inputs with
  their reasons; the batch stage table.

Every file is written atomically (:mod:`stemfast.atomic`).
"""
from __future__ import annotations

import base64
import html
import math
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from .atomic import write_text
from .figures import display_range, pyplot, save_figure, tight_layout

__all__ = [
    "ANALYSIS_WARNING_KEYS",
    "CLASS_COLORS",
    "class_color",
    "display_range",
    "plot_class_map",
    "plot_defects",
    "draw_candidate_map",
    "defects_layout",
    "stage_table_rows",
    "format_stage_table",
    "write_html_report",
]

#: Colour of class id ``i`` is ``CLASS_COLORS[i % len(CLASS_COLORS)]`` (class -1 / unknown: grey).
CLASS_COLORS = (
    "#e6194b",  # 0 red      (brightest class, e.g. Mo)
    "#3cb44b",  # 1 green    (e.g. S2)
    "#4363d8",  # 2 blue     (e.g. hollow)
    "#f58231",  # 3 orange
    "#911eb4",  # 4 purple
    "#42d4f4",  # 5 cyan
    "#f032e6",  # 6 magenta
    "#bfef45",  # 7 lime
    "#fabed4",  # 8 pink
    "#469990",  # 9 teal
)
_UNKNOWN = "#9e9e9e"

#: the keys of an analysis summary (:func:`stemfast.analysis.analyze_sites`) that hold a warning: shown
#: once each in the report and counted among the input's warnings
ANALYSIS_WARNING_KEYS = ("class_warning", "texture_warning", "naming_warning", "mixed_warning", "separation_warning",
                         "kind_warning", "detection_warning", "patch_warning")

#: Stages of the pipeline, in order, as they appear in the timing tables.
STAGES = ("read", "spacing", "bandpass", "peaks", "lattice", "describe", "patches", "encode", "analysis")

_MAX_DISPLAY_PX = 2048  # images are shown downsampled (block mean) to at most this many px


#: colour of the ring around a defect in the class map
DEFECT_RING = "#ffd600"
#: colour of the cross on a crowded site (the ``crowded`` column) in the class map
CROWDED_MARK = "#ffffff"


def class_color(class_id: int) -> str:
    """Fixed colour of a class id (hex string).

    Examples
    --------
    >>> class_color(0), class_color(10) == class_color(0), class_color(-1)
    ('#e6194b', True, '#9e9e9e')
    """
    c = int(class_id)
    return _UNKNOWN if c < 0 else CLASS_COLORS[c % len(CLASS_COLORS)]


def _downsample(image: np.ndarray) -> tuple[np.ndarray, int]:
    a = np.asarray(image, dtype=np.float32)
    f = max(1, int(math.ceil(max(a.shape) / _MAX_DISPLAY_PX)))
    if f == 1:
        return a, 1
    H, W = (a.shape[0] // f) * f, (a.shape[1] // f) * f
    return a[:H, :W].reshape(H // f, f, W // f, f).mean(axis=(1, 3)), f


def _dot_pt(fig_w_in: float, width_px: int, spacing_px: float | None, frac: float = 0.55) -> float:
    """Diameter (pt) on a ``fig_w_in`` inch wide map of ``width_px`` image px of a dot ``frac *
    spacing`` wide (without a spacing: 1/60 of the width, at least 2 px)."""
    sp = spacing_px if spacing_px and np.isfinite(spacing_px) else max(width_px / 60.0, 2.0)
    return frac * sp * fig_w_in * 72.0 / max(width_px, 1)


def _marker_size(fig_w_in: float, width_px: int, spacing_px: float | None, frac: float = 0.55) -> float:
    """Scatter marker area (pt^2) for a dot of diameter ``frac * spacing`` in image px."""
    return float(np.clip(_dot_pt(fig_w_in, width_px, spacing_px, frac), 0.4, 12.0) ** 2)


def _class_name(class_names: dict | None, c: int) -> str:
    name = (class_names or {}).get(str(c), (class_names or {}).get(c))
    return f": {name}" if name else ""


#: sites drawn smaller than this (dot diameter, pt) blend into one another on the page (a 4096^2 image
#: at a 12 px spacing: 0.9 pt): the class map then adds a crop at the image's own resolution
MIN_DOT_PT = 1.5
#: width of that crop in lattice spacings
ZOOM_SPACINGS = 24


def plot_class_map(path: str | os.PathLike, image: np.ndarray, x: np.ndarray, y: np.ndarray,
                   class_id: np.ndarray, *, spacing_px: float | None = None, title: str | None = None,
                   is_defect: np.ndarray | None = None, class_names: dict | None = None,
                   crowded: np.ndarray | None = None, inversion_domain: np.ndarray | None = None,
                   dpi: int = 110) -> None:
    """Write a PNG of ``image`` with every site as a dot coloured by its class id.

    Parameters
    ----------
    path : output PNG (written atomically).
    image : the 2-D micrograph (shown with a robust grey range, downsampled above 2048 px).
    x, y : site positions in px (x = column, y = row).
    class_id : int per site; colours are fixed per id (:data:`CLASS_COLORS`).
    spacing_px : lattice spacing, sets the dot size. Where the dots of the whole image would be
        smaller than :data:`MIN_DOT_PT`, the whole image shows only the defects and a second panel
        the classes of the central :data:`ZOOM_SPACINGS` spacings at the image's own resolution (its
        place framed on the whole image).
    is_defect : optional bool per site; flagged sites get a yellow ring.
    class_names : optional ``{class id (str or int): name}`` for the legend (e.g. the sublattice the
        class sits on).
    crowded : optional bool per site; crowded sites (the ``crowded`` column: another site closer than
        a regular lattice allows) get a white cross.
    inversion_domain : optional bool per site (the ``inversion_domain`` column); the edge of the
        domains is drawn as a dashed white line (:func:`_draw_domain_edge`).
    """
    plt = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    image = np.asarray(image)
    img, f = _downsample(image)
    H, W = img.shape
    fig_w = 8.0
    fig_h = max(3.0, min(12.0, fig_w * H / max(W, 1))) + 0.6
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    cid = np.asarray(class_id, dtype=np.int64) if len(x) else np.zeros(0, np.int64)
    d = np.asarray(is_defect, bool) if is_defect is not None and len(x) else np.zeros(len(x), bool)
    cr = np.asarray(crowded, bool) if crowded is not None and len(x) else np.zeros(len(x), bool)
    dense = bool(len(x) and spacing_px and np.isfinite(spacing_px) and _dot_pt(fig_w, W * f, spacing_px) < MIN_DOT_PT)
    legend_w = 2.6 if class_names else 1.8
    if dense:
        fig, (ax, az) = plt.subplots(1, 2, figsize=(2 * fig_w + legend_w, fig_h))
    else:
        fig, ax = plt.subplots(figsize=(fig_w + legend_w, fig_h))
        az = None
    lo, hi = display_range(img)
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest",
              extent=(-0.5, W * f - 0.5, H * f - 0.5, -0.5))
    s = _marker_size(fig_w, W * f, spacing_px)
    # on a dense map the classes are left to the crop (dots under a display pixel only make moire) and
    # the defect rings are drawn thin, or 10^4 of them cover the image
    _draw_sites(ax, x, y, cid, d, s, ring_lw=0.3 if dense else 1.2, classes=not dense, crowded=cr)
    dom = np.asarray(inversion_domain, bool) if inversion_domain is not None and len(x) else np.zeros(len(x), bool)
    if dom.any():
        _draw_domain_edge(ax, x, y, dom, (H * f, W * f), spacing_px)
    ax.set_xlim(-0.5, W * f - 0.5)
    ax.set_ylim(H * f - 0.5, -0.5)
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")
    if az is not None:
        h0, w0 = image.shape[-2:]
        half = 0.5 * ZOOM_SPACINGS * float(spacing_px)
        x0, x1 = int(max(0, np.floor(w0 / 2 - half))), int(min(w0, np.ceil(w0 / 2 + half)))
        y0, y1 = int(max(0, np.floor(h0 / 2 - half))), int(min(h0, np.ceil(h0 / 2 + half)))
        crop = np.asarray(image[y0:y1, x0:x1], dtype=np.float32)
        clo, chi = display_range(crop)
        az.imshow(crop, cmap="gray", vmin=clo, vmax=chi, interpolation="nearest",
                  extent=(x0 - 0.5, x1 - 0.5, y1 - 0.5, y0 - 0.5))
        inside = (x >= x0 - 0.5) & (x <= x1 - 0.5) & (y >= y0 - 0.5) & (y <= y1 - 0.5)
        _draw_sites(az, x[inside], y[inside], cid[inside], d[inside], _marker_size(fig_w, x1 - x0, spacing_px, 0.4),
                    ring_lw=1.2, crowded=cr[inside])
        az.set_xlim(x0 - 0.5, x1 - 0.5)
        az.set_ylim(y1 - 0.5, y0 - 0.5)
        az.set_xlabel("x (px)")
        az.set_title(f"centre, {ZOOM_SPACINGS} spacings at full resolution", fontsize=9)
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="w", linewidth=1.0))
    handles = [Line2D([], [], marker="o", ls="", color=class_color(c),
                      label=f"class {c}{_class_name(class_names, c)} ({int((cid == c).sum())})")
               for c in sorted(set(cid.tolist()))]
    if d.any():
        # a yellow ring: a black one vanished on the dark image between the columns
        handles.append(Line2D([], [], marker="o", ls="", mfc="none", mec=DEFECT_RING, label=f"defect ({int(d.sum())})"))
    if cr.any():
        handles.append(Line2D([], [], marker="x", ls="", color=CROWDED_MARK, mew=1.5,
                              label=f"crowded ({int(cr.sum())})", path_effects=[_crowded_outline()]))
    if dom.any():
        handles.append(Line2D([], [], ls="--", color="w", lw=1.5, path_effects=[_crowded_outline()],
                              label=f"inversion domain edge\n({int(dom.sum())} sites inside)"))
    if handles:
        (az if az is not None else ax).legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                                              fontsize=8, frameon=False)
    if not len(x):
        ax.text(0.5, 0.5, "no lattice sites", transform=ax.transAxes, ha="center", va="center",
                color="w", fontsize=14)
    ax.set_title(title or "site classes", fontsize=10)
    tight_layout(fig)
    save_figure(fig, path, dpi)


def _draw_sites(ax, x, y, cid, is_defect, s: float, *, ring_lw: float, classes: bool = True,
                crowded: np.ndarray | None = None) -> None:
    """Class-coloured dots of area ``s`` (pt^2; with ``classes``), yellow rings around the defects and
    white crosses on the ``crowded`` sites."""
    for c in sorted(set(cid.tolist())) if classes else ():
        m = cid == c
        ax.scatter(x[m], y[m], s=s, c=class_color(c), linewidths=0, alpha=0.85)
    if is_defect.any():
        ax.scatter(x[is_defect], y[is_defect], s=s * 4, facecolors="none", edgecolors=DEFECT_RING,
                   linewidths=ring_lw)
    if crowded is not None and crowded.any():
        ax.scatter(x[crowded], y[crowded], s=s * 1.5, marker="x", c=CROWDED_MARK, linewidths=ring_lw,
                   path_effects=[_crowded_outline()])


def _draw_domain_edge(ax, x, y, dom, shape, spacing_px) -> None:
    """The edge of the inversion domains (sites ``dom``) as a dashed white line: each point of a grid
    of about half a spacing takes the flag of its nearest site, within two spacings of one (no line
    where there are no sites: a hole, the film's edge)."""
    from scipy.spatial import cKDTree

    H, W = shape
    step = max(1.0, 0.5 * float(spacing_px)) if spacing_px and np.isfinite(spacing_px) else max(1.0, max(H, W) / 256)
    gx, gy = np.arange(0.0, W, step), np.arange(0.0, H, step)
    X, Y = np.meshgrid(gx, gy)
    dist, j = cKDTree(np.c_[x, y]).query(np.c_[X.ravel(), Y.ravel()])
    near = (dist <= 4.0 * step).reshape(X.shape)  # within two spacings of a site; none drawn into holes
    z = np.ma.masked_where(~near, dom[j].astype(float).reshape(X.shape))
    ax.contour(X, Y, z, levels=[0.5], colors="w", linewidths=1.5, linestyles="--")


def _crowded_outline():
    """A thin dark outline under the white crowded cross: it shows on light image and legend too."""
    from matplotlib import patheffects

    return patheffects.withStroke(linewidth=2.5, foreground="#202020")


#: a flagged candidate's circle and frame (solid) and one below the cutoff's (dashed) in ``defects.png``
FLAGGED_COLOUR = "#ff1744"
BELOW_CUTOFF_COLOUR = "#ffab00"
#: what the circles and frames of ``defects.png`` mean: its legend (:func:`draw_candidate_map`), whatever
#: its title, and the report's caption (:func:`_defects_caption`)
FLAGGED_LABEL = "flagged defect (anomaly score over the cutoff)"
BELOW_CUTOFF_LABEL = "candidate below the cutoff"
#: the title of the gallery of ``defects.png``: what each tile's label says
GALLERY_TITLE = "their patches: #rank, anomaly score, defect kind"
#: font size (pt) of the candidates' numbers on the map and of the gallery's labels: the report shows
#: the 15 in figure ~1350 px wide, where 6.5 pt labels on a figure shown half as wide were ~4 px high
LABEL_PT = 10.0


def plot_defects(path: str | os.PathLike, image: np.ndarray | None, candidates: Sequence[Mapping],
                 patches: np.ndarray | None, *, spacing_px: float | None = None, title: str | None = None,
                 max_gallery: int = 24, dpi: int = 110) -> None:
    """Write a PNG: the top candidates circled and numbered over ``image``, and their patches.

    Parameters
    ----------
    image : 2-D image the ``candidates`` of the map belong to (None: gallery only).
    candidates : ranked dicts with ``x, y, anomaly_score``, and optionally ``rank`` (the number
        shown; default position + 1), ``defect_kind``, ``is_defect``, ``frame`` and ``on_map``
        (False: only in the gallery, e.g. a candidate of another frame of a stack).
    patches : [len(candidates), S, S] patches of the candidates (None: no gallery).
    title : the map's title; the legend of the circles (:data:`FLAGGED_LABEL`, :data:`BELOW_CUTOFF_LABEL`)
        is drawn whatever it is.
    """
    cands = list(candidates)[:max_gallery]
    n = len(cands)
    if image is not None and np.shape(image)[1] >= WIDE_MAP_ASPECT * np.shape(image)[0]:
        fig, gs, ncol = _wide_defects_layout(n, np.shape(image))
    else:
        fig, gs, ncol = defects_layout(n)
    draw_candidate_map(fig.add_subplot(gs[0]), image, cands, spacing_px=spacing_px, title=title)
    if patches is not None and n:
        _draw_gallery(fig.add_subplot(gs[1]), np.asarray(patches)[:n], cands, ncol)
    save_figure(fig, path, dpi)


#: a map at least this many times wider than high is drawn across the figure above the gallery, not
#: beside it: a 100 x 512 px strip beside the gallery filled a sixth of the figure's height
WIDE_MAP_ASPECT = 2.0
#: the figure's margins (figure fractions) around the map and the gallery: the default ones (12 % left,
#: 10 % right, 12 % above and below) left a third of the figure empty
_MARGINS = dict(left=0.04, right=0.995, top=0.93)


def _wide_defects_layout(n: int, shape: tuple[int, int], ncol: int = 12):
    """:func:`defects_layout` for a wide map (:data:`WIDE_MAP_ASPECT`): ``(figure, gridspec, ncol)``, the
    map in row 0 across the figure (15 in wide, as high as its aspect asks) and the gallery, ``ncol``
    tiles a row, in row 1."""
    nrow = max(1, math.ceil(n / ncol)) if n else 1
    map_h = max(1.5, 14.3 * shape[0] / shape[1])
    gallery_h = 1.75 * (14.3 / ncol) * nrow  # a tile's pitch: its width and room for its title above it
    fig = pyplot().figure(figsize=(15.0, map_h + gallery_h + 2.0))
    gs = fig.add_gridspec(2, 1, height_ratios=[map_h, gallery_h], hspace=0.75 / max(map_h, gallery_h),
                          bottom=0.02, **_MARGINS)
    return fig, gs, ncol


def defects_layout(n: int, ncol: int = 6):
    """The figure of :func:`plot_defects` for ``n`` gallery tiles: ``(figure, gridspec, ncol)``, the
    candidate map in cell 0 of the grid, the gallery (``ncol`` tiles a row) in cell 1 beside it, each
    about as high as wide (the map's legend below it)."""
    fig = pyplot().figure(figsize=(15.0, 8.2))
    gs = fig.add_gridspec(1, 2, wspace=0.06, bottom=0.1, **_MARGINS)
    return fig, gs, ncol


def draw_candidate_map(ax, image: np.ndarray | None, cands: Sequence[Mapping], *, spacing_px: float | None = None,
                       title: str | None = None) -> None:
    """The left half of :func:`plot_defects`: ``image`` with the candidates circled (solid: flagged,
    dashed: below the cutoff; said in a legend below the map whatever the ``title``) and numbered by rank."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Circle

    n = len(cands)
    if image is not None:
        img, f = _downsample(image)
        H, W = img.shape
        lo, hi = display_range(img)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest",
                  extent=(-0.5, W * f - 0.5, H * f - 0.5, -0.5))
        r = 0.6 * (spacing_px if spacing_px and np.isfinite(spacing_px) else max(W * f / 60.0, 3.0))
        for i, c in enumerate(cands):
            if not c.get("on_map", True):
                continue
            rank = int(c.get("rank", i + 1))
            flagged = c.get("is_defect", True)
            col = FLAGGED_COLOUR if flagged else BELOW_CUTOFF_COLOUR
            ax.add_patch(Circle((c["x"], c["y"]), r, fill=False, ec=col, lw=1.2, ls="-" if flagged else "--"))
            ax.text(c["x"] + 0.75 * r, c["y"] - 0.75 * r, str(rank), color=col, fontsize=LABEL_PT - 1, ha="left",
                    va="bottom", fontweight="bold", clip_on=True)
        ax.set_xlim(-0.5, W * f - 0.5)
        ax.set_ylim(H * f - 0.5, -0.5)
        if n:
            # below the tick labels (2.5 font sizes under the axes), whatever the map's height
            ax.legend(handles=[Line2D([], [], color=FLAGGED_COLOUR, lw=1.5, label=FLAGGED_LABEL),
                               Line2D([], [], color=BELOW_CUTOFF_COLOUR, lw=1.5, ls="--", label=BELOW_CUTOFF_LABEL)],
                      loc="upper center", bbox_to_anchor=(0.5, 0.0), borderaxespad=2.5, ncol=2,
                      fontsize=LABEL_PT - 1, frameon=False, handlelength=2.5)
    else:
        ax.axis("off")
    ax.set_title(title or "top defect candidates", fontsize=LABEL_PT + 1)
    if n == 0:
        ax.text(0.5, 0.5, "no candidates", transform=ax.transAxes, ha="center", va="center", fontsize=14,
                color="w" if image is not None else "k")


def _draw_gallery(ax, P: np.ndarray, cands: Sequence[Mapping], ncol: int) -> None:
    """The candidates' patches as one mosaic in ``ax``, ``ncol`` per row, each under its title
    (rank, score, kind) and framed in its colour (dashed below the cutoff, as on the map). One axes and
    one image for the whole gallery: an axes per tile (ticks, spines, layout) made up most of the
    figure's time."""
    from matplotlib.patches import Rectangle

    n, S = len(P), P.shape[-1]
    nrow = math.ceil(n / ncol)
    gx, gy = 0.15 * S, 0.75 * S  # gaps between tiles: small across, room for a 3-line title above
    pitch_x, pitch_y = S + gx, S + gy
    W, H = ncol * pitch_x - gx, nrow * pitch_y
    lo, hi = display_range(P)
    ax.set_facecolor("white")
    for i, c in enumerate(cands):
        x0, y0 = (i % ncol) * pitch_x, (i // ncol) * pitch_y + gy
        ax.imshow(P[i], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest",
                  extent=(x0, x0 + S, y0 + S, y0))
        flagged = c.get("is_defect", True)
        ax.add_patch(Rectangle((x0, y0), S, S, fill=False, ec=FLAGGED_COLOUR if flagged else BELOW_CUTOFF_COLOUR,
                               lw=1.2, ls="-" if flagged else "--"))
        rank = int(c.get("rank", i + 1))
        label = f"#{rank}"
        if c.get("frame") is not None and c.get("show_frame", False):
            label += f" f{int(c['frame'])}"
        label += f"  {float(c['anomaly_score']):.1f}"
        # the kind on a line of its own, with a break at its underscore, so long names such as
        # 'substitution_Mo' stay inside their tile instead of running into the neighbour's title
        kind = str(c.get("defect_kind", "") or "").replace("_", "\n", 1)
        ax.text(x0 + S / 2, y0 - 0.04 * S, f"{label}\n{kind}" if kind else label, fontsize=LABEL_PT,
                linespacing=0.95, ha="center", va="bottom")
    ax.set_xlim(-0.5, W + 0.5)
    ax.set_ylim(H + 0.5, 0)
    ax.set_aspect("equal")
    ax.set_anchor("N")
    ax.axis("off")
    ax.set_title(GALLERY_TITLE, fontsize=LABEL_PT + 1)


# ----------------------------------------------------------------------------- tables


def stage_table_rows(seconds: Mapping[str, float], sites: Mapping[str, int] | int,
                     stages: Iterable[str] = STAGES) -> list[dict]:
    """Rows ``{stage, seconds, sites, sites_per_s}`` (stages with no time recorded are left out)."""
    rows = []
    for st in list(stages) + [k for k in seconds if k not in stages]:
        if st not in seconds:
            continue
        sec = float(seconds[st])
        n = int(sites[st] if isinstance(sites, Mapping) else sites)
        rows.append({"stage": st, "seconds": sec, "sites": n,
                     "sites_per_s": (n / sec) if sec > 0 else None})
    total = sum(r["seconds"] for r in rows)
    if rows:
        n_tot = max(r["sites"] for r in rows)
        rows.append({"stage": "total", "seconds": total, "sites": n_tot,
                     "sites_per_s": (n_tot / total) if total > 0 else None})
    return rows


def format_stage_table(rows: Sequence[Mapping]) -> str:
    """Plain-text table of :func:`stage_table_rows` output."""
    lines = [f"{'stage':<10} {'seconds':>10} {'sites':>11} {'sites/s':>12}"]
    for r in rows:
        sps = r.get("sites_per_s")
        lines.append(f"{r['stage']:<10} {r['seconds']:>10.3f} {r['sites']:>11d} "
                     f"{(f'{sps:,.0f}' if sps else '-'):>12}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.5em} h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
h3{font-size:1em;margin:.8em 0 .3em}
table{border-collapse:collapse;margin:.4em 0;font-size:.85em}
td,th{border:1px solid #ddd;padding:.2em .5em;text-align:right} th{background:#f4f4f4}
td.l,th.l{text-align:left}
.bad{color:#b00020;font-weight:bold} .ok{color:#1b5e20} .warn{color:#e65100} .note{color:#444}
.legend{font-size:0.8em;color:#444;max-width:32em} .caption{font-size:0.85em;color:#444;margin:.8em 0 0}
img{max-width:100%;border:1px solid #ddd;margin:.3em 0}
.grid{display:flex;flex-wrap:wrap;gap:1.5em} .grid>div{flex:1 1 420px}
small{color:#666}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _img_tag(path: Path, alt: str) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError:
        return f"<p class='warn'>{_e(alt)}: image missing</p>"
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{base64.b64encode(data).decode('ascii')}'>"


#: the report mentions the border's excess noise when a band's is above this (the scores are divided
#: by any excess above 1 either way)
EDGE_NOTE_ABOVE = 1.1


def _edge_note(ratios) -> str:
    """One line on the border bands whose column z were noisier than inside (scores divided there)."""
    hi = [(k, r) for k, r in enumerate(ratios or []) if r is not None and r > 1.0]
    if not any(r > EDGE_NOTE_ABOVE for _, r in hi):  # a few percent is the spread's own noise
        return ""
    bands = ", ".join(f"{k}-{k + 1} spacings: {r:.2f}x" for k, r in hi)
    return (f"<p>Near the image border the column intensities scatter more than inside ({_e(bands)}); "
            "the scores there are divided by that excess.</p>")


def _scan_note(scan: dict) -> str:
    """What was done to the image's scan lines before the sites were found (``summary.json``'s
    ``lattice.scan_lines``), as a paragraph; "" when nothing."""
    rows, jumps = list(scan.get("flagged_rows") or []), list(scan.get("jump_rows") or [])
    said = []
    if rows:
        shown = ", ".join(str(r) for r in rows[:12]) + (", ..." if len(rows) > 12 else "")
        said.append(f"{len(rows)} scan line(s) off against the lattice (streaks) levelled before the columns were "
                    f"found: rows {shown}")
    segs = list(scan.get("segments") or [])
    if segs:
        shown = ", ".join(f"row {r} x {a}-{b - 1}" for r, a, b, _ in segs[:8]) + (", ..." if len(segs) > 8 else "")
        said.append(f"{len(segs)} part(s) of scan lines off against the lattice (streaks over part of a line) "
                    f"levelled before the columns were found: {shown}")
    dead = list(scan.get("dead") or [])
    if dead:
        shown = ", ".join(f"row {r} x {a}-{b - 1}" for r, a, b in dead[:8]) + (", ..." if len(dead) > 8 else "")
        said.append(f"{len(dead)} part(s) of scan lines recorded as one value (not recorded: a dropout) filled from "
                    f"the lines above and below before the columns were found: {shown}")
    if jumps:
        px = list(scan.get("jump_px") or [])
        bands = [f"rows {a}-{b - 1} by {px[2 * i]:+.2f} px" if 2 * i < len(px) else f"rows {a}-{b - 1}"
                 for i, (a, b) in enumerate(zip(jumps[::2], jumps[1::2]))]
        said.append(f"{len(bands)} band(s) of scan lines jumped sideways and moved back before the lattice was "
                    f"found ({'; '.join(bands)}); sites are reported where the recorded image has them")
    return "".join(f"<p class='warn'>scan: {_e(t)}</p>" for t in said)


def _lattice_source(lat: Mapping) -> str:
    """How the site lattice was found, in words: the Bragg ring (and how it was re-read, :func:`_ring_note_words`),
    the given spacing, or the Bragg ring where a spacing was given that the image has no lattice at
    (``summary.json``'s ``lattice``: ``spacing_source``, ``given_spacing_px``, ``ring_prominence``, ``ring_note``)."""
    source = lat.get("spacing_source")
    if not source:
        return "-"
    given = lat.get("given_spacing_px")
    prom = f" (prominence {float(lat['ring_prominence']):.0f})" if lat.get("ring_prominence") is not None else ""
    if source == "given":
        src = f"the given spacing{f' {float(given):.2f} px' if given else ''}{prom}"
    elif source == "fft ring":
        src = f"the metal lattice's Bragg ring{prom}"
    else:  # a spacing was given, the lattice is the image's own at another
        src = (f"the metal lattice's Bragg ring{prom} at {_fmt(lat.get('spacing_px'), 2)} px, not the given "
               f"{_fmt(given, 2)} px (which sized the filters and the column search only)")
    note = _ring_note_words(lat.get("ring_note"))
    return src + (f"; {note}" if note else "")


#: what the Bragg ring's notes (:class:`stemfast.braggring.FftLattice`'s ``note``; ``summary.json``'s
#: ``lattice.ring_note``) say in the report, in order; "" leaves one out: a re-read of the strongest
#: spots as a lower-order family ``{110}->{100}`` / ``{200}->{100}`` is what every MoS2 image does
_RING_NOTE_WORDS = (
    (r"ring picked by the given spacing", ""),
    (r"\{110\}->\{100\} \(columns on one third of the nodes\)",
     "; re-read sqrt(3)x coarser: the columns sat on one node in three"),
    (r"\{(\d)00\}->\{100\} \(columns on one coset of the lattice \d+x as coarse\)",
     lambda m: f"; re-read {m[1]}x coarser: the columns sat on one node in {int(m[1]) ** 2}"),
    (r"\{[12][10]0\}->\{100\}", ""),
    (r"\(spots of a distorted lattice: wide search\)", "; the spots of a distorted lattice (found by a wider search)"),
    (r"\(1/\d+ spots inside the ring: a coarser lattice\)",
     "; re-read as a coarser lattice (strong spots inside the ring)"),
    (r"read on the film \((\d+%) of the image dark vacuum left out\)",
     r"; the ring read on the film, the dark vacuum (\1 of the image) left out"),
)


def _ring_note_words(note) -> str:
    """The ring's note (``lattice.ring_note``) in a microscopist's words (:data:`_RING_NOTE_WORDS`), "" for
    none worth saying.

    >>> _ring_note_words("{110}->{100}"), _ring_note_words("{110}->{100} (spots of a distorted lattice: wide search)")
    ('', 'the spots of a distorted lattice (found by a wider search)')
    """
    text = str(note or "")
    for pattern, words in _RING_NOTE_WORDS:
        text = re.sub(pattern, words, text)
    return "; ".join(p.strip() for p in text.split(";") if p.strip())


def _defect_facts(s: Mapping) -> dict:
    """The flagged sites' lines of an image's facts: how many, and the summary's ``flagged_fdr`` (per
    sublattice, the estimated share of its flagged sites the noise alone makes, e.g. ``S2 0.4%, Mo 31%``)."""
    fdr = s.get("flagged_fdr") or {}
    share = ", ".join(f"{k} {100 * float(v):.2g}%" for k, v in fdr.items())
    return {"defects (anomaly > cutoff)": s.get("n_defects", 0), "of them from noise alone, estimated": share or "-"}


def _kv_table(d: Mapping, head: tuple[str, str]) -> str:
    rows = "".join(f"<tr><td class='l'>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in d.items())
    return f"<table><tr><th class='l'>{_e(head[0])}</th><th>{_e(head[1])}</th></tr>{rows}</table>"


def _kind_legend(kinds: Mapping, material) -> str:
    """What each defect kind in ``kinds`` means for ``material`` (:attr:`Material.defect_kind_meanings`),
    one small line each; empty when none is known."""
    from .materials import get_material

    try:
        meanings = get_material(material or "mos2").defect_kind_meanings
    except ValueError:
        return ""
    lines = [f"<b>{_e(k)}</b>: {_e(meanings[k])}" for k in kinds if k in meanings and k != "none"]
    return f"<p class='legend'>{'<br>'.join(lines)}</p>" if lines else ""


def _fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.{nd}f}"
    return str(v)


def _stage_html(rows: Sequence[Mapping]) -> str:
    out = ["<table><tr><th class='l'>stage</th><th>seconds</th><th>sites</th><th>sites/s</th></tr>"]
    for r in rows:
        sps = r.get("sites_per_s")
        out.append(f"<tr><td class='l'>{_e(r['stage'])}</td><td>{r['seconds']:.3f}</td><td>{r['sites']}</td>"
                   f"<td>{(f'{sps:,.0f}' if sps else '-')}</td></tr>")
    out.append("</table>")
    return "".join(out)


def _companion_line(s: Mapping) -> str:
    """The input's second detector (``summary.json``: ``companion``, ``detectors``), one line; empty without one."""
    comp = s.get("companion")
    if not comp:
        return ""
    sha = str(((s.get("input") or {}).get("companion") or {}).get("sha256") or "")[:16]
    how = ("the defect scores weigh both images' local z" if int(s.get("detectors") or 1) == 2
           else "not used (no sites)")
    if s.get("companion_signal"):
        comp = f"{comp}, its image {s['companion_signal']}"
        if s.get("companion_found") == "automatic":
            how += " (found in the input's own file; --no-companion: alone)"
    elif s.get("companion_found") == "automatic":
        how += " (found beside the input: its name differs in the detector's name alone; --no-companion: alone)"
    named = (s.get("sublattice_naming") or {}).get("from_companion")
    if named:
        angle = "higher" if named.get("companion_higher_angle") else "lower"
        how += (f"; the sublattice names are taken from it: recorded at {angle} angles (by the detectors' names), "
                f"it shows brighter the sublattice this image shows fainter, and a {angle} detector angle cannot "
                "turn the metal / chalcogen order that way")
    return (f"<p>second detector of the same scan (companion): <code>{_e(comp)}</code>"
            f"{' &middot; sha256 ' + _e(sha) + '&hellip;' if sha else ''} &middot; {how}</p>")


def _kernels_line(s: Mapping) -> str:
    """One line where the input's kernels did not run compiled because the extension could not be
    imported (``summary.json``: ``backend``, ``core_import_error``); empty otherwise."""
    why = s.get("core_import_error")
    if not why:
        return ""
    used = s.get("backend") or "Numba / NumPy"
    return (f"<p class='warn'>kernels: {_e(used)}, not the compiled C++ extension (the stage times above are "
            f"theirs, slower): {_e(why)}</p>")


def _input_facts(s: Mapping, lat: Mapping, inp: Mapping) -> dict:
    """The key-value table of one input's section: sites, defects, classes, the lattice and what was
    repaired in the image."""
    facts = {
        "sites": s.get("n_sites", 0),
        **_defect_facts(s),
        "classes": s.get("n_classes", "-"),
        "classes vs sublattices (ARI)": _fmt(s.get("class_sublattice_ari"), 2),
        "spacing (px)": _fmt(lat.get("spacing_px")),
        "spacing (nm)": _fmt(lat.get("spacing_nm"), 4) if lat.get("spacing_nm") else "-",
        "lattice from": _lattice_source(lat),
        # an uncertain lattice's confidence is capped (stemfast.sites.UNSURE_MAX_CONFIDENCE); its number says less
        # than the warning's reasons
        "lattice confidence": "uncertain (see warning)" if lat.get("unsure") else _fmt(lat.get("confidence"), 2),
        "lattice rotation (deg)": _fmt(lat.get("rotation_deg"), 2),
        "peak memory (MiB)": _fmt(s.get("peak_memory_mib"), 0),
    }
    if lat.get("grains"):
        from .grains import grain_orientations

        facts["grains (orientation, share of the image)"] = f"{len(lat['grains'])}: {grain_orientations(lat['grains'])}"
    if lat.get("spikes"):
        where = " (first frame)" if int(inp.get("n_frames") or 1) > 1 else ""
        facts[f"single-pixel spikes replaced{where}"] = f"{lat['spikes']['n']} ({100 * float(lat['spikes']['share']):.3f}%)"
    if lat.get("hole_fraction"):
        facts["vacuum: holes, the flake's edge (no sites)"] = f"{100 * float(lat['hole_fraction']):.1f}% of the image"
    return facts


def _defects_caption(s: Mapping) -> str:
    """One line above an input's ``defects.png``: what its circles, frames and labels mean ("" without
    candidates)."""
    if not s.get("top"):
        return ""
    return (f"<p class='caption'>Top defect candidates by anomaly score, numbered by rank. Solid red circle and "
            f"frame: {_e(FLAGGED_LABEL)}; dashed orange: {_e(BELOW_CUTOFF_LABEL)}. Each patch is labelled "
            "#rank, anomaly score, defect kind.</p>")


def _input_section(s: Mapping, folder: Path, *, batch_model_sha: str | None = None) -> str:
    name = s.get("name", "?")
    status = s.get("status", "?")
    cls = "ok" if status in ("ok", "current") else "warn"
    inp = s.get("input", {})
    lat = s.get("lattice", {}) or {}
    parts = [f"<h2 id='{_e(name)}'>{_e(name)} <small class='{cls}'>[{_e(status)}]</small></h2>"]
    msha = s.get("model_sha256")
    parts.append(f"<p><small>{_e(inp.get('path', ''))} &middot; sha256 {_e(str(inp.get('sha256', ''))[:16])}&hellip; "
                 f"&middot; model {_e(str(msha or '-')[:16])}&hellip; "
                 f"&middot; shape {_e(inp.get('shape'))} &middot; frames {_e(inp.get('n_frames', 1))}"
                 f"{' &middot; pixel ' + _e('%.5g' % float(inp['pixel_size'])) + ' ' + _e(inp.get('unit')) if inp.get('pixel_size') else ''}"
                 f"{' (not used: see warning)' if inp.get('pixel_size') and inp.get('calibration_ignored') else ''}"
                 f"</small></p>")
    parts.append(_companion_line(s))
    # what cannot be fully trusted comes first, before any number it qualifies
    warns = list(s.get("warnings") or [])
    if batch_model_sha and msha and msha != batch_model_sha:
        warns.append(f"these results were made with model {str(msha)[:16]}..., not this batch's model "
                     f"{batch_model_sha[:16]}...")
    for w in warns:
        parts.append(f"<p class='warn'>warning: {_e(w)}</p>")
    # the reader's facts (a pixel size from a sidecar, the series read): notes, not counted as warnings
    for n in inp.get("notes") or []:
        if n not in warns:
            parts.append(f"<p class='note'>note: {_e(n)}</p>")
    if s.get("frame_errors"):
        parts.append("<p class='bad'>frames that failed: "
                     + ", ".join(f"{_e(k)}: {_e(v)}" for k, v in s["frame_errors"].items()) + "</p>")
    facts = _input_facts(s, lat, inp)
    on = s.get("class_sublattice") or {}
    counts = {f"class {k}" + (f" ({on[k]['sublattice']}, {100 * on[k]['share']:.1f}% of its sites)" if k in on else ""): v
              for k, v in (s.get("class_counts") or {}).items()}
    kinds = dict(s.get("defect_kinds") or {}) or {"(none)": 0}
    parts.append("<div class='grid'><div>" + _kv_table(facts, ("", "")) + "</div><div>"
                 + _kv_table(counts or {"(none)": 0}, ("class", "sites")) + _kv_table(kinds, ("defect kind", "sites"))
                 + _kind_legend(kinds, lat.get("material"))
                 + "</div><div><h3>stages</h3>" + _stage_html(s.get("throughput", [])) + "</div></div>")
    parts.append(_kernels_line(s))
    for key in ANALYSIS_WARNING_KEYS:
        if s.get(key) and s[key] not in warns:  # not twice: the warnings at the top may hold it already
            parts.append(f"<p class='warn'>{_e(s[key])}</p>")
    parts.append(_edge_note(s.get("edge_z_spread")))
    parts.append(_scan_note(lat.get("scan_lines") or {}))
    if str(s.get("rotation_latent", "")).startswith("left out"):
        parts.append(f"<p class='warn'>classes from the latent means only; rotation latent {_e(s['rotation_latent'])}</p>")
    parts.extend(_drift_html(s.get("drift_px"), (s.get("tracking") or {}).get("drift_breaks") or []))
    # the defect figure on a row of its own: beside the class map it was shown 620 px wide for its 1650
    parts.append(_img_tag(folder / "classes.png", f"{name} classes"))
    parts.append(_defects_caption(s) + _img_tag(folder / "defects.png", f"{name} defects"))
    if s.get("tracking"):
        from .tracking import tracks_html

        parts.append(tracks_html(s, folder, _img_tag))
    top = s.get("top", [])[:20]
    if top:
        parts.append("<h3>top defect candidates</h3><table><tr><th>#</th><th>frame</th><th>x</th><th>y</th>"
                     "<th>score</th><th class='l'>kind</th><th>class</th><th>defect</th></tr>")
        for i, t in enumerate(top):
            parts.append(f"<tr><td>{i + 1}</td><td>{t.get('frame', 0)}</td><td>{t['x']:.1f}</td><td>{t['y']:.1f}</td>"
                         f"<td>{t['anomaly_score']:.2f}</td><td class='l'>{_e(t.get('defect_kind', ''))}</td>"
                         f"<td>{t.get('class_id', '')}</td><td>{'yes' if t.get('is_defect') else ''}</td></tr>")
        parts.append("</table>")
    return "\n".join(parts)


def _drift_html(drift: dict | None, breaks: list) -> list[str]:
    """The report's lines on a stack's drift (``summary.json`` ``drift_px``, the tracking's ``drift_breaks``):
    the steps between consecutive frames, the total with the drift measured across frames without a
    lattice (``over_gap``), the frames whose drift is unknown and where the defect tracks end."""
    drift = drift or {}
    gap = drift.get("over_gap") or {}
    out = []
    dx, dy = np.asarray(drift.get("dx") or [], float), np.asarray(drift.get("dy") or [], float)
    gx, gy = np.asarray(gap.get("dx") or [], float), np.asarray(gap.get("dy") or [], float)
    if len(dx) or len(gx):
        steps = (f"mean |d| {np.mean(np.hypot(dx, dy)):.2f} px, max {np.max(np.hypot(dx, dy)):.2f} px, "
                 if len(dx) else "")
        over = ", ".join(f"{a} to {b}" for a, b in zip(gap.get("from_frame") or [], gap.get("frame") or []))
        across = f" and {len(gx)} across frames without a lattice ({_e(over)})" if len(gx) else ""
        out.append(f"<p>drift between consecutive frames: {steps}total ({np.sum(dx) + np.sum(gx):.2f}, "
                   f"{np.sum(dy) + np.sum(gy):.2f}) px over {len(dx)} steps{across}</p>")
    if drift.get("unknown"):
        unk = [str(f) for f in drift["unknown"]]
        shown = ", ".join(unk[:12]) + (f" and {len(unk) - 12} more" if len(unk) > 12 else "")
        end = (f": defect tracks end at frame(s) {_e(', '.join(map(str, breaks)))} (drift breaks)" if breaks else
               ": no defect track ends there (the drift is measured across them)")
        out.append(f"<p class='warn'>drift unknown at frame(s) {_e(shown)} (a frame without a lattice, or whose "
                   f"drift could not be measured){end}</p>")
    return out


def _model_used(model: Mapping) -> str:
    """The batch's model in the report's header (HTML): name, version, checksum, where it comes from
    (or why there is none), the engine and device that ran it, and its architecture."""
    if not (model.get("sha256") or model.get("source")):
        return "none (no input was analysed)"
    head = " ".join(_e(v) for v in (model.get("name"), model.get("version")) if v)
    sha = f" sha256 {_e(str(model['sha256'])[:16])}&hellip;" if model.get("sha256") else ""
    arch = model.get("architecture") or {}
    net = (f"; {_e(arch.get('model'))}, latent {_e(arch.get('latent_dim'))}, input {_e(arch.get('input_size'))} px"
           if arch else "")
    return (f"{head}{sha} ({_e(model.get('source', ''))}"
            f"{', ' + _e(model['engine']) + ' engine' if model.get('engine') else ''}"
            f"{' on ' + _e(model['device']) if model.get('device') else ''}{net})").lstrip()


def _neutral_note(batch: Mapping) -> list[str]:
    """A line naming the inputs whose results were made with other values of settings that change no
    result than this run's (``made_with_other_neutral_settings`` of the batch summary), or none."""
    other = batch.get("made_with_other_neutral_settings") or {}
    if not other:
        return []
    now = batch.get("neutral_settings") or {}
    groups: dict[str, list[str]] = {}  # the inputs made with the same values, named together
    for name, vals in other.items():
        groups.setdefault(", ".join(f"{k} = {v!r}" for k, v in vals.items()), []).append(name)
    made = "; ".join(f"{', '.join(names)}: {vals}" for vals, names in groups.items())
    asked = ", ".join(f"{k} = {now.get(k)!r}" for k in sorted({k for v in other.values() for k in v}))
    return ["<p><small>" + _e(f"results kept from an earlier run, made with other values of settings that change "
                              f"no result than this run's ({asked}): {made}") + "</small></p>"]


def write_html_report(path: str | os.PathLike, *, batch: Mapping, summaries: Sequence[Mapping],
                      out_dir: str | os.PathLike) -> None:
    """Write the batch report: one HTML file, images embedded, openable offline.

    Parameters
    ----------
    batch : the batch summary (``batch_summary.json`` content: ``inputs`` statuses, ``skipped``
        list of ``{name, path, reason}``, ``stage_table`` rows, ``model`` info, ``config_hash``).
    summaries : per-input ``summary.json`` contents (with ``name``).
    out_dir : the batch output folder (the figures are read from ``out_dir/<name>/``).
    """
    out_dir = Path(out_dir)
    title = f"stemfast batch report: {out_dir.name}"
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
             f"<style>{_CSS}</style></head><body>", f"<h1>{_e(title)}</h1>"]
    model = batch.get("model", {}) or {}
    parts.append(f"<p><small>stemfast {_e(batch.get('stemfast_version', ''))} &middot; {_e(batch.get('date', ''))} "
                 f"&middot; config {_e(batch.get('config_hash', ''))} &middot; model {_model_used(model)}</small></p>")
    if model.get("refused"):  # the shipped model was not used: said where the results are read
        parts.append("<p class='warn'>warning: " + _e(f"the shipped default model was not used ({model['refused']}); "
                                                      "a model was trained on these inputs instead") + "</p>")
    parts.extend(_neutral_note(batch))
    # overview
    parts.append("<h2>inputs</h2><table><tr><th class='l'>input</th><th class='l'>status</th><th>frames</th>"
                 "<th>sites</th><th>defects</th><th class='l'>defect kinds</th><th>spacing px</th></tr>")
    by_name = {s.get("name"): s for s in summaries}
    for it in batch.get("inputs", []):
        s = by_name.get(it.get("name"), {})
        st = it.get("status", "?")
        cls = "bad" if st in ("skipped", "failed", "partial") else "ok"
        if st in ("done", "current") and s.get("status") in ("no lattice", "partial"):  # not a full result
            st, cls = f"{st}: {s['status']}", "warn"
        kinds = ", ".join(f"{k}: {v}" for k, v in (s.get("defect_kinds") or {}).items())
        link = f"<a href='#{_e(it.get('name'))}'>{_e(it.get('name'))}</a>" if s else _e(it.get("name"))
        # each warning once: the batch summary lists the analysis' warnings among its warnings too
        n_warn = len(set(s.get("warnings") or []) | {s[k] for k in ANALYSIS_WARNING_KEYS if s.get(k)})
        warn = f" <span class='warn'>({n_warn} warning{'s' if n_warn > 1 else ''})</span>" if n_warn else ""
        parts.append(f"<tr><td class='l'>{link}</td><td class='l {cls}'>{_e(st)}"
                     f"{(': ' + _e(it.get('reason'))) if it.get('reason') else ''}{warn}</td>"
                     f"<td>{_e(s.get('input', {}).get('n_frames', '-') if s else '-')}</td>"
                     f"<td>{_e(s.get('n_sites', '-'))}</td><td>{_e(s.get('n_defects', '-'))}</td>"
                     f"<td class='l'>{_e(kinds)}</td><td>{_fmt((s.get('lattice') or {}).get('spacing_px'))}</td></tr>")
    parts.append("</table>")
    others = batch.get("other_results") or []
    if others:  # an earlier run's results in the same folder: said, with the settings they were made with
        by = {}
        for r in others:
            by.setdefault(r.get("settings") or "no record left", []).append(r.get("name", "?"))
        parts.append("<p class='warn'>warning: " + _e(f"{len(others)} result folder{'s' if len(others) > 1 else ''} in "
                     "this output folder are not in this report (an earlier run's inputs): ")
                     + "; ".join(_e(f"{', '.join(names)} (settings: {how})") for how, names in by.items()) + "</p>")
    skipped = batch.get("skipped", [])
    if skipped:
        parts.append("<h2 class='bad'>skipped inputs</h2><table><tr><th class='l'>input</th>"
                     "<th class='l'>reason</th></tr>")
        for sk in skipped:
            parts.append(f"<tr><td class='l'>{_e(sk.get('path', sk.get('name')))}</td>"
                         f"<td class='l'>{_e(sk.get('reason'))}</td></tr>")
        parts.append("</table>")
    if batch.get("stage_table"):
        if len(summaries) > 1:  # one input: its own section shows the same table
            parts.append("<h2>throughput (whole batch)</h2>" + _stage_html(batch["stage_table"]))
        if batch.get("train"):
            tr = batch["train"]
            parts.append(f"<p>model training: {_fmt(tr.get('seconds'), 1)} s on {_e(tr.get('n_patches', '-'))} "
                         f"patches</p>")
    for s in summaries:
        parts.append(_input_section(s, out_dir / str(s.get("name")), batch_model_sha=model.get("sha256")))
    parts.append("</body></html>\n")
    write_text(path, "\n".join(parts))
