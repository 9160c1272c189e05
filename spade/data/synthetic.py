"""The built-in procedural landscapes: the project's embedded default data set.

Every scene is drawn from a numpy Generator: a label map of eight stuff classes
(sky, cloud, mountain, water, grass, tree, sand, rock) laid out like a landscape,
and a photo-like RGB rendering with a colour and texture per class and a per-scene
lighting. The same seed, count and size always give byte-identical files, and each
scene depends only on (seed, split, index), so a larger count keeps the first scenes.

The set is written in the `custom` layout::

    OUT/train_label/000000.png   uint8 class ids (mode L)
    OUT/train_img/000000.jpg     RGB, JPEG quality 95
    OUT/val_label/, OUT/val_img/ likewise
    OUT/classes.txt              "id<TAB>name" per line
    OUT/dataset.json             the parameters; written last, it marks a complete set
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from spade.errors import SpadeError
from spade.progress import progress_bar

CLASS_NAMES: tuple[str, ...] = ("sky", "cloud", "mountain", "water", "grass", "tree", "sand", "rock")
SKY, CLOUD, MOUNTAIN, WATER, GRASS, TREE, SAND, ROCK = range(len(CLASS_NAMES))

# A colour per class for drawing label maps (previews, the painter page); not the rendered look.
CLASS_COLORS: tuple[tuple[int, int, int], ...] = (
    (110, 170, 250),  # sky
    (240, 240, 240),  # cloud
    (150, 100, 60),  # mountain
    (30, 60, 200),  # water
    (90, 200, 60),  # grass
    (20, 90, 30),  # tree
    (240, 210, 120),  # sand
    (120, 120, 120),  # rock
)

DATASET_NAME = "builtin-landscapes"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
JPEG_QUALITY = 95
_NUMBERED = re.compile(r"^\d{6}\.(png|jpg)$")
_TEMP_PREFIX = ".tmp-"
_LAYOUT_ENTRIES = {f"{split}_{kind}" for split in SPLITS for kind in ("label", "img")} | {"classes.txt"}


# --------------------------------------------------------------------------- noise


def _coords(size: int) -> np.ndarray:
    """Pixel centres in relative units, (0, 1)."""
    return (np.arange(size) + 0.5) / size


def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def _lattice(pos: np.ndarray, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell index and smoothed fraction of relative positions on a grid of `cells` cells."""
    scaled = pos * cells
    idx = np.minimum(np.floor(scaled).astype(np.int64), cells - 1)
    return idx, _smooth(scaled - idx)


def _value_noise(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, cells: tuple[int, int]) -> np.ndarray:
    """Smooth noise in [0, 1] on the grid ys x xs; draws depend on `cells` only, not on the resolution."""
    cy, cx = cells
    grid = rng.random((cy + 1, cx + 1))
    iy, fy = _lattice(ys, cy)
    ix, fx = _lattice(xs, cx)
    fx = fx[None, :]
    top = grid[iy][:, ix] * (1 - fx) + grid[iy][:, ix + 1] * fx
    bottom = grid[iy + 1][:, ix] * (1 - fx) + grid[iy + 1][:, ix + 1] * fx
    fy = fy[:, None]
    return top * (1 - fy) + bottom * fy


def _fbm(
    rng: np.random.Generator,
    ys: np.ndarray,
    xs: np.ndarray,
    cells: tuple[int, int],
    octaves: int = 3,
    gain: float = 0.5,
) -> np.ndarray:
    """Fractal sum of value noise, normalised to about [0, 1] with mean 0.5."""
    total = np.zeros((ys.size, xs.size))
    amp, norm = 1.0, 0.0
    for octave in range(octaves):
        scale = 2**octave
        total += amp * _value_noise(rng, ys, xs, (cells[0] * scale, cells[1] * scale))
        norm += amp
        amp *= gain
    return total / norm


def _fbm1d(rng: np.random.Generator, xs: np.ndarray, cells: int, octaves: int = 4, gain: float = 0.5) -> np.ndarray:
    return _fbm(rng, np.array([0.5]), xs, (1, cells), octaves, gain)[0]


def _quantile_mask(values: np.ndarray, within: np.ndarray, coverage: float) -> np.ndarray:
    """The `coverage` fraction of `within` where `values` are highest."""
    if coverage <= 0 or not within.any():
        return np.zeros_like(within)
    threshold = np.quantile(values[within], 1.0 - min(coverage, 1.0))
    return within & (values >= threshold)


# --------------------------------------------------------------------------- layout


@dataclass
class _Scene:
    """A label map and the geometry the painter shades it with (relative units)."""

    labels: np.ndarray
    horizon: float
    cloud_density: np.ndarray  # 0 outside clouds, 0..1 inside
    mountain_below: np.ndarray  # distance below the ridge line
    mountain_height: np.ndarray  # ridge height above the horizon in that column
    mountain_slope: np.ndarray  # ridge slope (positive where the ridge rises to the right)
    mountain_far: np.ndarray  # 1 on the farther of two ranges
    shade: np.ndarray  # per-object lighting of trees and boulders, 1 elsewhere
    trunk: np.ndarray  # the trunks of trees


def _layout(rng: np.random.Generator, size: int) -> _Scene:
    ys = xs = _coords(size)
    Y, X = np.meshgrid(ys, xs, indexing="ij")
    labels = np.full((size, size), SKY, np.uint8)
    zeros = np.zeros((size, size))
    scene = _Scene(
        labels=labels,
        horizon=0.0,
        cloud_density=zeros.copy(),
        mountain_below=zeros.copy(),
        mountain_height=zeros.copy(),
        mountain_slope=zeros.copy(),
        mountain_far=zeros.copy(),
        shade=np.ones((size, size)),
        trunk=np.zeros((size, size), bool),
    )
    kinds = ("meadow", "coast", "lake", "rocky", "desert")
    kind = kinds[rng.choice(len(kinds), p=[0.3, 0.25, 0.2, 0.15, 0.1])]
    horizon = float(rng.uniform(0.34, 0.66))
    scene.horizon = horizon
    flat = kind == "coast"
    ground_line = horizon + (0.0 if flat else rng.uniform(0.02, 0.07)) * (_fbm1d(rng, xs, 3, 2) - 0.5)
    ground = ground_line[None, :] <= Y

    if rng.random() < 0.6:
        _add_clouds(rng, scene, Y, xs, ys, ~ground)
    if rng.random() < (0.35 if flat else 0.7):
        _add_mountains(rng, scene, Y, xs, ground_line, ~ground)

    _fill_ground(rng, kind, scene, Y, X, xs, ys, ground)

    has_grass = (labels == GRASS).any()
    if kind in ("meadow", "lake") and has_grass and rng.random() < 0.35:
        _add_tree_line(rng, labels, Y, xs, ground_line)
    n_trees = {"meadow": (2, 9), "lake": (1, 7), "coast": (0, 4), "rocky": (0, 4), "desert": (0, 3)}[kind]
    if has_grass:
        _add_trees(rng, scene, Y, X, int(rng.integers(*n_trees)))
    if kind != "lake" or rng.random() < 0.5:
        _add_boulders(rng, scene, Y, X, ground, int(rng.integers(0, 5 if kind == "rocky" else 3)))
    return scene


def _add_clouds(
    rng: np.random.Generator, scene: _Scene, Y: np.ndarray, xs: np.ndarray, ys: np.ndarray, sky: np.ndarray
) -> None:
    # Wider than tall, floating in one or two bands of the sky.
    cells = (int(rng.integers(5, 9)), int(rng.integers(3, 7)))
    noise = _fbm(rng, ys, xs, cells, 2, 0.45)
    band = np.zeros_like(Y)
    for _ in range(int(rng.integers(1, 3))):
        centre, width = rng.uniform(0.15, 0.75) * scene.horizon, rng.uniform(0.08, 0.2)
        band = np.maximum(band, np.exp(-(((Y - centre) / width) ** 2)))
    noise = noise * (0.35 + 0.65 * band)
    clouds = _quantile_mask(noise, sky, float(rng.uniform(0.06, 0.35)))
    if clouds.any():
        low = noise[clouds].min()
        scene.cloud_density[clouds] = np.clip((noise[clouds] - low) / 0.08, 0.0, 1.0)
        scene.labels[clouds] = CLOUD


def _add_mountains(
    rng: np.random.Generator, scene: _Scene, Y: np.ndarray, xs: np.ndarray, ground_line: np.ndarray, above: np.ndarray
) -> None:

    n_ranges = 2 if rng.random() < 0.35 else 1
    for r in range(n_ranges):
        far = r == 0 and n_ranges == 2
        height = rng.uniform(0.12, 0.4) * (1.0 if far or n_ranges == 1 else 0.6)
        height = min(height, float(ground_line.min()) - 0.1)
        profile = _fbm1d(rng, xs, int(rng.integers(2, 5)), 6, float(rng.uniform(0.45, 0.6)))
        profile = (profile - profile.min()) / max(np.ptp(profile), 1e-6)
        cut = rng.uniform(0.0, 0.35)
        profile = np.clip((profile - cut) / (1.0 - cut), 0.0, 1.0) ** rng.uniform(0.8, 1.3)
        ridge = ground_line - height * profile
        rows = np.maximum(ridge, 0.1)
        m = above & (rows[None, :] <= Y) & (profile[None, :] > 0.0)
        if not m.any():
            continue
        scene.labels[m] = MOUNTAIN
        below = np.broadcast_to(Y - rows[None, :], Y.shape)
        tall = np.broadcast_to((ground_line - rows)[None, :], Y.shape)
        # Flanks are lit by the slope of the smoothed ridge, so light changes side at the big peaks only.
        width = max(3, round(0.08 * xs.size)) | 1
        smooth = np.convolve(np.pad(rows, width // 2, mode="edge"), np.ones(width) / width, mode="valid")
        slope = np.broadcast_to(np.gradient(-smooth, xs)[None, :], Y.shape)
        scene.mountain_below[m] = below[m]
        scene.mountain_height[m] = tall[m]
        scene.mountain_slope[m] = slope[m]
        scene.mountain_far[m] = 1.0 if far else 0.0


def _fill_ground(
    rng: np.random.Generator,
    kind: str,
    scene: _Scene,
    Y: np.ndarray,
    X: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    ground: np.ndarray,
) -> None:
    labels, horizon = scene.labels, scene.horizon

    def patches(cls: int, coverage: float, within: np.ndarray) -> None:
        # Flattened by perspective: more variation down the image than across it.
        noise = _fbm(rng, ys, xs, (int(rng.integers(5, 9)), int(rng.integers(2, 4))), 3)
        labels[_quantile_mask(noise, within, coverage)] = cls

    def lake(centre_y: float, radius: float, shore: int | None) -> None:
        cx = rng.uniform(0.2, 0.8)
        cy = horizon + centre_y * (1.0 - horizon)
        rx = radius
        ry = rx * rng.uniform(0.25, 0.45) * (0.35 + 0.65 * (cy - horizon) / (1.0 - horizon))
        wobble = _fbm(rng, ys, xs, (4, 4), 2) - 0.5
        d = ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 + 0.8 * wobble
        if shore is not None:
            labels[ground & (d < rng.uniform(1.4, 1.9))] = shore
        labels[ground & (d < 1.0)] = WATER

    if kind == "coast":
        shore = horizon + (1.0 - horizon) * rng.uniform(0.25, 0.6) + 0.08 * (_fbm1d(rng, xs, 3) - 0.5)
        beach = shore + (1.0 - horizon) * rng.uniform(0.08, 0.25) * (0.6 + 0.8 * _fbm1d(rng, xs, 4))
        inland = (GRASS, GRASS, SAND, ROCK)[rng.integers(4)]
        labels[ground] = inland
        labels[ground & (beach[None, :] > Y)] = SAND
        labels[ground & (shore[None, :] > Y)] = WATER
        if inland == GRASS and rng.random() < 0.5:
            patches(SAND, rng.uniform(0.05, 0.2), labels == GRASS)
    elif kind == "desert":
        labels[ground] = SAND
        patches(ROCK, rng.uniform(0.05, 0.3), ground)
        if rng.random() < 0.4:
            lake(rng.uniform(0.3, 0.7), rng.uniform(0.08, 0.18), GRASS)
    elif kind == "rocky":
        labels[ground] = ROCK
        patches(GRASS, rng.uniform(0.2, 0.55), ground)
        if rng.random() < 0.3:
            patches(SAND, rng.uniform(0.05, 0.15), ground)
        if rng.random() < 0.3:
            lake(rng.uniform(0.3, 0.8), rng.uniform(0.1, 0.25), None)
    else:  # meadow, lake
        labels[ground] = GRASS
        if rng.random() < 0.5:
            patches(ROCK, rng.uniform(0.04, 0.15), ground)
        if rng.random() < 0.3:
            patches(SAND, rng.uniform(0.05, 0.15), ground)
        if kind == "lake":
            lake(rng.uniform(0.15, 0.55), rng.uniform(0.2, 0.45), SAND if rng.random() < 0.5 else None)
        elif rng.random() < 0.25:
            lake(rng.uniform(0.3, 0.8), rng.uniform(0.08, 0.2), None)


def _add_tree_line(rng: np.random.Generator, labels: np.ndarray, Y: np.ndarray, xs: np.ndarray, line: np.ndarray):
    height = rng.uniform(0.03, 0.08)
    crowns = _fbm1d(rng, xs, int(rng.integers(10, 20)), 2, 0.4)
    extent = _fbm1d(rng, xs, 3, 2) < rng.uniform(0.5, 0.8)  # the line has gaps
    top = line - height * (0.4 + 0.8 * crowns)
    band = (top[None, :] <= Y) & (line[None, :] + 0.015 > Y) & extent[None, :]
    band &= np.isin(labels, (SKY, CLOUD, MOUNTAIN, GRASS))
    labels[band] = TREE


def _add_trees(rng: np.random.Generator, scene: _Scene, Y: np.ndarray, X: np.ndarray, n: int) -> None:
    labels, horizon, size = scene.labels, scene.horizon, scene.labels.shape[0]
    bases = []
    for _ in range(n):
        for _attempt in range(12):
            x = rng.uniform(0.05, 0.95)
            y = horizon + rng.uniform(0.05, 1.0) * (1.0 - horizon)
            row, col = min(int(y * size), size - 1), min(int(x * size), size - 1)
            if labels[row, col] == GRASS:
                bases.append((y, x, rng.random(), rng.uniform(0.75, 1.3), rng.uniform(0, 2 * np.pi, 3)))
                break
    for y, x, form, scale, phases in sorted(bases, key=lambda b: b[0]):  # far first, near ones occlude
        depth = (y - horizon) / (1.0 - horizon)
        height = min((0.07 + 0.32 * depth) * scale, y - 0.12)
        trunk_h = height * (0.22 if form < 0.4 else 0.3)
        trunk_w = max(height * 0.07, 1.0 / size)
        if form < 0.4:  # conifer: a ragged triangle
            top = y - height
            rel = (Y - top) / (height - trunk_h)
            half = 0.28 * height * rel * (1.0 + 0.12 * np.sin(rel * 25 + phases[0]))
            crown = (rel >= 0) & (rel <= 1.05) & (np.abs(X - x) <= half)
            light = 1.15 - 0.45 * np.clip(rel, 0, 1) - 0.8 * (X - x) / height
        else:  # broadleaf: a lumpy ellipse on a trunk
            ry = (height - trunk_h) / 2
            rx = ry * rng.uniform(0.8, 1.2)
            cy = y - trunk_h - ry
            angle = np.arctan2(Y - cy, X - x)
            radius = 1.0 + 0.12 * np.sin(3 * angle + phases[0]) + 0.08 * np.sin(5 * angle + phases[1])
            crown = ((X - x) / rx) ** 2 + ((Y - cy) / ry) ** 2 <= radius**2
            light = 1.1 - 0.35 * (Y - cy) / ry - 0.25 * (X - x) / rx
        trunk = (np.abs(X - x) <= trunk_w / 2) & (y - trunk_h - 0.02 * height <= Y) & (y >= Y) & ~crown
        labels[crown | trunk] = TREE
        scene.trunk[trunk] = True
        scene.trunk[crown] = False
        scene.shade[crown] = np.clip(light[crown], 0.55, 1.3)
        scene.shade[trunk] = 1.0


def _add_boulders(
    rng: np.random.Generator, scene: _Scene, Y: np.ndarray, X: np.ndarray, ground: np.ndarray, n: int
) -> None:
    labels, horizon = scene.labels, scene.horizon
    for _ in range(n):
        cx = rng.uniform(0.05, 0.95)
        cy = horizon + rng.uniform(0.15, 1.0) * (1.0 - horizon)
        d = (cy - horizon) / (1.0 - horizon)
        rx = (0.02 + 0.07 * d) * rng.uniform(0.7, 1.4)
        ry = rx * rng.uniform(0.5, 0.85)
        dist = ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2
        stone = ground & (dist <= 1.0) & (cy + 0.35 * ry >= Y) & (labels != TREE)
        labels[stone] = ROCK
        scene.shade[stone] = np.clip(1.2 - 0.5 * (Y[stone] - (cy - ry)) / (1.35 * ry), 0.6, 1.25)


# --------------------------------------------------------------------------- painting


def _jitter(rng: np.random.Generator, colour: tuple[float, float, float], amount: float) -> np.ndarray:
    return np.clip(np.asarray(colour) + rng.uniform(-amount, amount, 3), 0.0, 1.0)


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray | float) -> np.ndarray:
    t = np.asarray(t)
    if t.ndim == 2 and t.shape[-1] != 1:  # a per-pixel map for colour arrays
        t = t[..., None]
    return a * (1 - t) + b * t


def _lighting(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Sky colours and a global colour gain for the scene's time of day and weather."""
    mood = rng.choice(3, p=[0.65, 0.2, 0.15])
    if mood == 0:  # day
        top, horizon, gain = (0.22, 0.45, 0.85), (0.68, 0.8, 0.93), (1.0, 1.0, 1.0)
    elif mood == 1:  # golden hour
        top, horizon, gain = (0.33, 0.45, 0.78), (0.96, 0.75, 0.52), (1.08, 0.96, 0.82)
    else:  # overcast
        top, horizon, gain = (0.55, 0.6, 0.68), (0.78, 0.8, 0.82), (0.9, 0.93, 0.97)
    return {
        "sky_top": _jitter(rng, top, 0.06),
        "sky_horizon": _jitter(rng, horizon, 0.05),
        "gain": np.asarray(gain) * rng.uniform(0.88, 1.08) + rng.uniform(-0.03, 0.03, 3),
    }


def _paint(rng: np.random.Generator, scene: _Scene) -> np.ndarray:
    labels = scene.labels
    size = labels.shape[0]
    px = size / 64.0  # texture periods are given in pixels at 64 x 64
    ys = xs = _coords(size)
    Y = np.broadcast_to(ys[:, None], (size, size))
    light = _lighting(rng)
    sky_top, sky_hz = light["sky_top"], light["sky_horizon"]
    img = np.zeros((size, size, 3))
    grain = rng.random((size, size)) - 0.5
    depth = np.clip((Y - scene.horizon) / (1.0 - scene.horizon), 0.0, 1.0)

    def put(cls: int, colour: np.ndarray) -> None:
        m = labels == cls
        if m.any():
            img[m] = colour[m] if colour.ndim == 3 else colour

    # Sky: a vertical gradient to a paler horizon.
    t = np.clip(Y / max(scene.horizon, 1e-3), 0.0, 1.0) ** 0.8
    sky = _mix(sky_top, sky_hz, t) + 0.015 * (_fbm(rng, ys, xs, (2, 4), 2) - 0.5)[..., None]
    put(SKY, sky)

    # Clouds: soft white, denser cores brighter, greyer underneath.
    if (labels == CLOUD).any():
        white = _mix(np.array([0.97, 0.97, 0.98]), sky_hz, 0.15)
        puff = 0.86 + 0.2 * _fbm(rng, ys, xs, (6, 10), 2) - 0.1 * t
        alpha = 0.55 + 0.45 * scene.cloud_density
        put(CLOUD, _mix(sky, white * puff[..., None], alpha))

    # Mountains: brownish, bluish or olive rock; lit flanks, darker foot, snow on tall peaks, haze.
    if (labels == MOUNTAIN).any():
        base = _jitter(rng, [(0.5, 0.4, 0.32), (0.38, 0.42, 0.52), (0.4, 0.42, 0.3)][rng.integers(3)], 0.05)
        rel = np.clip(scene.mountain_below / np.maximum(scene.mountain_height, 1e-3), 0.0, 1.0)
        flank = 1.0 + 0.3 * np.tanh(1.5 * scene.mountain_slope * rng.choice([-1.0, 1.0]))
        rough = _fbm(rng, ys, xs, (8, 12), 3) - 0.5
        shade = (1.15 - 0.4 * rel) * flank + 0.4 * rough
        mountain = base * shade[..., None]
        if rng.random() < 0.5:
            snowline = rng.uniform(0.12, 0.22)
            snow = (scene.mountain_height > snowline) & (
                scene.mountain_below < 0.5 * (scene.mountain_height - snowline) + 0.03 * rough
            )
            mountain[snow] = np.array([0.93, 0.94, 0.97]) * (0.9 + 0.15 * shade[snow, None])
        haze = 0.15 + 0.3 * scene.mountain_far + 0.15 * rel
        put(MOUNTAIN, _mix(mountain, sky_hz, haze))

    # Water: the sky reflected darker, deeper blue nearby, horizontal ripples widening towards the viewer.
    if (labels == WATER).any():
        deep = _jitter(rng, (0.06, 0.2, 0.32), 0.04)
        water = _mix(_mix(sky_hz * 0.75, deep, 0.45), deep * 0.8, depth)
        period = px * (2.0 + 3.0 * depth[:, 0])
        phase = np.cumsum(2 * np.pi / period)[:, None] + 3.0 * _fbm(rng, ys, xs, (6, 4), 2)
        ripple = np.sin(phase)
        water = water * (1.0 + 0.14 * ripple + 0.05 * grain)[..., None]
        glint = (ripple > 0.85) & (grain > 0.3)
        water[glint] = _mix(water[glint], sky_hz, 0.5)
        put(WATER, water)

    # Grass: green with patchy tone and short vertical blade streaks.
    if (labels == GRASS).any():
        base = _jitter(rng, (0.3, 0.52, 0.18), 0.06)
        blades = (grain + np.roll(grain, 1, 0) + np.roll(grain, 2, 0)) / 3
        tone = 0.8 + 0.35 * _fbm(rng, ys, xs, (6, 8), 3) + 0.45 * blades
        put(GRASS, base * tone[..., None] * (0.9 + 0.2 * depth)[..., None])

    # Trees: dark green leafy clumps, lit from the upper left; brown trunks.
    if (labels == TREE).any():
        base = _jitter(rng, (0.12, 0.3, 0.12), 0.04)
        cells = max(4, round(16 * rng.uniform(0.8, 1.2)))
        clumps = _fbm(rng, ys, xs, (cells, cells), 2)
        tone = (0.55 + 0.8 * clumps + 0.15 * grain) * scene.shade
        tree = base * tone[..., None]
        trunk_colour = _jitter(rng, (0.3, 0.2, 0.12), 0.04)
        tree[scene.trunk] = trunk_colour * (0.9 + 0.2 * grain[scene.trunk, None])
        put(TREE, tree)

    # Sand: pale, fine grain and faint wind ripples.
    if (labels == SAND).any():
        base = _jitter(rng, (0.86, 0.76, 0.55), 0.04)
        dunes = np.sin(2 * np.pi * Y * size / (px * 5) + 4 * _fbm(rng, ys, xs, (4, 4), 2))
        put(SAND, base * (0.97 + 0.12 * grain + 0.03 * dunes)[..., None])

    # Rock: grey, speckled, with dark cracks.
    if (labels == ROCK).any():
        base = _jitter(rng, (0.5, 0.49, 0.47), 0.05)
        crack_noise = _fbm(rng, ys, xs, (6, 6), 2)
        cracks = np.abs(crack_noise - 0.5) < 0.03
        tone = (0.85 + 0.3 * _fbm(rng, ys, xs, (10, 10), 2) + 0.35 * grain) * scene.shade
        tone = np.where(cracks, tone * 0.5, tone)
        put(ROCK, base * tone[..., None])

    # Aerial perspective: the ground fades into the horizon colour far away.
    ground = np.isin(labels, (WATER, GRASS, TREE, SAND, ROCK))
    haze = 0.45 * (1.0 - depth) ** 5
    img[ground] = _mix(img[ground], sky_hz, haze[ground][:, None])

    img = img * light["gain"] + 0.01 * grain[..., None]
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One random landscape: (size, size) uint8 class ids and a (size, size, 3) uint8 RGB image.

    The layout is drawn from its own child generator with draws that do not depend
    on `size`, so one seed gives the same scene at every resolution.
    """
    layout_rng, paint_rng = (np.random.default_rng(s) for s in rng.integers(0, 2**63, size=2))
    scene = _layout(layout_rng, size)
    return scene.labels, _paint(paint_rng, scene)


# --------------------------------------------------------------------------- files


def _save_atomic(img: Image.Image, path: Path, **options: object) -> None:
    fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            img.save(fh, **options)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _validate(count: int, val_count: int, size: int, seed: int) -> None:
    problems = []
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 999_999:
        problems.append(f"count must be an integer from 1 to 999999, got {count!r}")
    if not isinstance(val_count, int) or isinstance(val_count, bool) or not 0 <= val_count <= 999_999:
        problems.append(f"val_count must be an integer from 0 to 999999, got {val_count!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 16 or size % 16:
        problems.append(f"size must be a multiple of 16 and at least 16 (e.g. 64 or 128), got {size!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        problems.append(f"seed must be a non-negative integer, got {seed!r}")
    if problems:
        raise SpadeError("cannot generate the built-in data set: " + "; ".join(problems))


def _is_complete(root: Path, meta: dict) -> bool:
    for split, n in (("train", meta["count"]), ("val", meta["val_count"])):
        for kind, suffix in (("label", ".png"), ("img", ".jpg")):
            folder = root / f"{split}_{kind}"
            if not all((folder / f"{i:06d}{suffix}").is_file() for i in range(n)):
                return False
            if sum(1 for p in folder.iterdir() if _NUMBERED.match(p.name)) != n:
                return False
    return (root / "classes.txt").is_file()


def _clean_stale(root: Path, meta: dict) -> None:
    """Remove numbered files beyond the requested counts and temp files from interrupted runs."""
    for split, n in (("train", meta["count"]), ("val", meta["val_count"])):
        for kind in ("label", "img"):
            folder = root / f"{split}_{kind}"
            for p in folder.iterdir():
                stale = _NUMBERED.match(p.name) and int(p.name[:6]) >= n
                if stale or p.name.startswith(_TEMP_PREFIX):
                    p.unlink()


def generate_builtin_dataset(
    out: str | Path,
    *,
    count: int = 200,
    val_count: int | None = None,
    size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write `count` training and `val_count` validation landscapes to `out` in the custom layout.

    `val_count` defaults to max(8, count // 10). Re-running into a complete set with the
    same parameters does nothing; a set made with other parameters is replaced only
    with `overwrite=True`. Returns the data set folder.
    """
    if val_count is None:
        val_count = max(8, count // 10) if isinstance(count, int) else 0
    _validate(count, val_count, size, seed)
    root = Path(out)
    meta = {
        "name": DATASET_NAME,
        "version": FORMAT_VERSION,
        "seed": seed,
        "count": count,
        "val_count": val_count,
        "size": size,
        "classes": list(CLASS_NAMES),
    }
    if root.exists() and not root.is_dir():
        raise SpadeError(f"{root}: exists and is not a folder; choose another output path")
    marker = root / "dataset.json"
    if marker.is_file():
        try:
            existing = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            existing = {"unreadable": str(exc)}
        if existing == meta:
            if _is_complete(root, meta):
                return root
        elif not overwrite:
            shown = {k: existing.get(k) for k in ("name", "seed", "count", "val_count", "size")}
            raise SpadeError(
                f"{root}: holds a data set generated with different parameters {shown}; "
                f"requested seed={seed}, count={count}, val_count={val_count}, size={size}. "
                "Pass overwrite=True (--overwrite) to replace it, or choose another folder"
            )
        marker.unlink()
    elif root.is_dir() and not overwrite:
        foreign = sorted(p.name for p in root.iterdir() if p.name not in _LAYOUT_ENTRIES)
        if foreign:
            raise SpadeError(
                f"{root}: is not empty and holds no built-in data set (found {', '.join(foreign[:5])}); "
                "choose an empty or new folder, or pass overwrite=True (--overwrite)"
            )

    for split in SPLITS:
        for kind in ("label", "img"):
            (root / f"{split}_{kind}").mkdir(parents=True, exist_ok=True)
    _clean_stale(root, meta)
    _write_text_atomic(root / "classes.txt", "".join(f"{i}\t{name}\n" for i, name in enumerate(CLASS_NAMES)))
    jobs = [
        (split_id, split, i)
        for split_id, (split, n) in enumerate(zip(SPLITS, (count, val_count), strict=True))
        for i in range(n)
    ]
    for split_id, split, i in progress_bar(jobs, desc=f"landscapes {size}px", unit="scene", disable=not progress):
        labels, image = render_scene(np.random.default_rng([seed, split_id, i]), size)
        _save_atomic(Image.fromarray(labels, mode="L"), root / f"{split}_label" / f"{i:06d}.png", format="PNG")
        _save_atomic(
            Image.fromarray(image, mode="RGB"),
            root / f"{split}_img" / f"{i:06d}.jpg",
            format="JPEG",
            quality=JPEG_QUALITY,
        )
    _write_text_atomic(marker, json.dumps(meta, indent=2) + "\n")
    return root


def read_class_names(root: str | Path) -> list[str]:
    """Class names from `root/classes.txt` ("id<TAB>name" lines, ids 0..n-1 in order)."""
    path = Path(root) / "classes.txt"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SpadeError(f"{path}: no such file; a data set folder needs one 'id<TAB>name' line per class") from None
    names = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        ident, sep, name = line.partition("\t")
        if not sep or not ident.strip().isdigit() or not name.strip():
            raise SpadeError(f"{path}:{lineno}: expected 'id<TAB>name', got {line!r}")
        if int(ident) != len(names):
            raise SpadeError(f"{path}:{lineno}: class ids must run 0, 1, 2, ... in order; expected {len(names)}")
        names.append(name.strip())
    if not names:
        raise SpadeError(f"{path}: lists no classes")
    return names
