"""Pillow renderer for demo-world scene graphs: a hotel room seen from the doorway.

render_scene is a pure function of the scene graph (no randomness beyond fixed texture
seeds), so equal scenes give equal pixels and a one-attribute change in the graph is the
only change in the picture. Drawing happens at 2x and is reduced to 256 px for smooth
edges; room backgrounds and pattern sheets are cached per process.
"""

from __future__ import annotations

import math
import random
import struct
import zlib
from functools import lru_cache
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from .vocab import COLOUR_RGB, LAYER, WALL_RGB

SIZE = 256  # output pixels
SS = 2  # supersampling factor
Colour = tuple[int, int, int]

# Room geometry in 256-unit coordinates (one-point perspective, vanishing point VP).
VP = (128.0, 90.0)
WALL_X0, WALL_X1, WALL_TOP, WALL_BOTTOM = 22.0, 234.0, 16.0, 150.0
SIDE_FLOOR_Y = 162.0  # where the side walls meet the picture edge at floor level

WALL_SLOT_X = {"left": 60.0, "centre": 128.0, "right": 196.0}
FLOOR_SLOT_X = {"left": 54.0, "centre": 128.0, "right": 202.0}
WALL_SLOT_WIDTH = 64.0
FLOOR_SLOT_WIDTH = 74.0
SIZE_SCALE = {"large": 1.0, "small": 0.7}


def _shade(c: Colour, f: float) -> Colour:
    return (min(255, int(c[0] * f)), min(255, int(c[1] * f)), min(255, int(c[2] * f)))


def _mix(c: Colour, d: Colour, t: float) -> Colour:
    return (int(c[0] + (d[0] - c[0]) * t), int(c[1] + (d[1] - c[1]) * t), int(c[2] + (d[2] - c[2]) * t))


def _luma(c: Colour) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _contrast(c: Colour) -> Colour:
    """The second colour of a pattern: darker on light colours, lighter on dark ones."""
    return _shade(c, 0.58) if _luma(c) > 150 else _mix(c, (255, 255, 255), 0.62)


def _outline(c: Colour) -> Colour:
    return _shade(c, 0.55) if _luma(c) > 60 else _mix(c, (255, 255, 255), 0.25)


def _pt(x: float, y: float) -> tuple[float, float]:
    return (x * SS, y * SS)


def _pts(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(x * SS, y * SS) for x, y in points]


def _box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0 * SS, y0 * SS, x1 * SS, y1 * SS]


# ---------------------------------------------------------------- cached sheets


@lru_cache(maxsize=64)
def _pattern_sheet(pattern: str, colour: Colour) -> Image.Image:
    """A canvas-sized sheet of the pattern in the colour and its contrast colour."""
    size = SIZE * SS
    sheet = Image.new("RGB", (size, size), colour)
    draw = ImageDraw.Draw(sheet)
    second = _contrast(colour)
    if pattern == "striped":
        period, width = 12 * SS, 6 * SS
        for x in range(0, size, period):
            draw.rectangle([x, 0, x + width - 1, size], fill=second)
    elif pattern == "dotted":
        period, r = 11 * SS, 3.1 * SS
        for row, y in enumerate(range(0, size + period, period)):
            offset = period // 2 if row % 2 else 0
            for x in range(-period, size + period, period):
                cx, cy = x + offset, y
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=second)
    elif pattern == "checked":
        period = 9 * SS
        for row, y in enumerate(range(0, size, period)):
            for col, x in enumerate(range(0, size, period)):
                if (row + col) % 2:
                    draw.rectangle([x, y, x + period - 1, y + period - 1], fill=second)
    return sheet


def _floor_line_x(x_at_wall: float, y: float) -> float:
    """x on the line from the vanishing point through (x_at_wall, WALL_BOTTOM) at height y."""
    return VP[0] + (x_at_wall - VP[0]) * (y - VP[1]) / (WALL_BOTTOM - VP[1])


def _floor_rows() -> list[float]:
    """Heights of floor rows receding in perspective (spacing grows toward the viewer)."""
    rows = []
    i = 0
    while True:
        y = VP[1] + (WALL_BOTTOM - VP[1]) / (1 - 0.11 * i)
        if y > SIZE + 40 or 1 - 0.11 * i <= 0:
            break
        rows.append(y)
        i += 1
    rows.append(float(SIZE + 40))
    return rows


def _draw_floor(img: Image.Image, floor: str) -> None:
    draw = ImageDraw.Draw(img)
    rng = random.Random(f"floor-{floor}")  # fixed texture per floor type
    rows = _floor_rows()
    if floor == "wooden":
        step, base = 13.0, (170, 118, 74)
        columns = [WALL_X0 - 200 + i * step for i in range(int((WALL_X1 - WALL_X0 + 400) / step) + 1)]
        for r0, r1 in zip(rows, rows[1:]):
            for c0, c1 in zip(columns, columns[1:]):
                tone = _shade(base, rng.uniform(0.82, 1.08))
                quad = [(_floor_line_x(c0, r0), r0), (_floor_line_x(c1, r0), r0),
                        (_floor_line_x(c1, r1), r1), (_floor_line_x(c0, r1), r1)]
                draw.polygon(_pts(quad), fill=tone, outline=_shade(base, 0.62))
    elif floor == "tiled":
        step = 26.0
        columns = [WALL_X0 - 260 + i * step for i in range(int((WALL_X1 - WALL_X0 + 520) / step) + 1)]
        light, dark = (214, 210, 200), (168, 170, 172)
        for ri, (r0, r1) in enumerate(zip(rows, rows[1:])):
            for ci, (c0, c1) in enumerate(zip(columns, columns[1:])):
                quad = [(_floor_line_x(c0, r0), r0), (_floor_line_x(c1, r0), r0),
                        (_floor_line_x(c1, r1), r1), (_floor_line_x(c0, r1), r1)]
                draw.polygon(_pts(quad), fill=light if (ri + ci) % 2 else dark, outline=(120, 118, 114))
    elif floor == "marble":
        step = 40.0
        columns = [WALL_X0 - 400 + i * step for i in range(int((WALL_X1 - WALL_X0 + 800) / step) + 1)]
        for r0, r1 in list(zip(rows, rows[1:]))[::1]:
            for c0, c1 in zip(columns, columns[1:]):
                tone = _shade((232, 230, 226), rng.uniform(0.95, 1.03))
                quad = [(_floor_line_x(c0, r0), r0), (_floor_line_x(c1, r0), r0),
                        (_floor_line_x(c1, r1), r1), (_floor_line_x(c0, r1), r1)]
                draw.polygon(_pts(quad), fill=tone, outline=(190, 188, 184))
        veins = Image.new("L", (SIZE * SS, SIZE * SS), 0)
        vd = ImageDraw.Draw(veins)
        for _ in range(16):
            x, y = rng.uniform(0, SIZE), rng.uniform(WALL_BOTTOM, SIZE)
            points = [(x, y)]
            for _ in range(7):
                x += rng.uniform(-16, 16)
                y += rng.uniform(2, 10)
                points.append((x, y))
            vd.line(_pts(points), fill=120, width=2 * SS)
        veins = veins.filter(ImageFilter.GaussianBlur(2 * SS))
        img.paste((176, 172, 178), (0, 0), veins)  # soft grey veins
    elif floor == "carpeted":
        draw.rectangle(_box(0, WALL_BOTTOM, SIZE, SIZE), fill=(150, 128, 116))
        for _ in range(3500):  # pile speckle
            x, y = rng.uniform(0, SIZE), rng.uniform(WALL_BOTTOM, SIZE)
            tone = _shade((150, 128, 116), rng.uniform(0.85, 1.12))
            draw.rectangle(_box(x, y, x + 1, y + 1), fill=tone)
    else:
        raise ValueError(f"unknown floor {floor!r}")


@lru_cache(maxsize=48)
def _room(wall: str, floor: str) -> Image.Image:
    """Ceiling, walls, floor and skirting of an empty room (supersampled)."""
    size = SIZE * SS
    img = Image.new("RGB", (size, size), (0, 0, 0))
    _draw_floor(img, floor)
    draw = ImageDraw.Draw(img)
    w = WALL_RGB[wall]
    draw.rectangle(_box(WALL_X0, WALL_TOP, WALL_X1, WALL_BOTTOM), fill=w)
    # a soft vertical band of light on the back wall, as from a ceiling light
    band = Image.new("RGB", (size, size), _mix(w, (255, 250, 235), 0.16))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse(_box(40, -60, 216, 150), fill=110)
    mask = mask.filter(ImageFilter.GaussianBlur(28 * SS))
    img.paste(band, (0, 0), mask)
    side = _shade(w, 0.8)
    draw.polygon(_pts([(0, 0), (WALL_X0, WALL_TOP), (WALL_X0, WALL_BOTTOM), (0, SIDE_FLOOR_Y)]), fill=side)
    draw.polygon(_pts([(SIZE, 0), (WALL_X1, WALL_TOP), (WALL_X1, WALL_BOTTOM), (SIZE, SIDE_FLOOR_Y)]), fill=side)
    ceiling = _mix(w, (250, 248, 244), 0.6)
    draw.polygon(_pts([(0, 0), (SIZE, 0), (WALL_X1, WALL_TOP), (WALL_X0, WALL_TOP)]), fill=ceiling)
    draw.line(_pts([(WALL_X0, WALL_TOP), (WALL_X1, WALL_TOP)]), fill=_shade(w, 0.85), width=SS)
    # skirting boards along the back and side walls
    skirting = (236, 234, 228) if _luma(w) < 200 else (206, 200, 190)
    draw.rectangle(_box(WALL_X0, WALL_BOTTOM - 5, WALL_X1, WALL_BOTTOM), fill=skirting)
    draw.polygon(_pts([(0, SIDE_FLOOR_Y - 6), (WALL_X0, WALL_BOTTOM - 5), (WALL_X0, WALL_BOTTOM), (0, SIDE_FLOOR_Y)]),
                 fill=_shade(skirting, 0.85))
    draw.polygon(_pts([(SIZE, SIDE_FLOOR_Y - 6), (WALL_X1, WALL_BOTTOM - 5), (WALL_X1, WALL_BOTTOM), (SIZE, SIDE_FLOOR_Y)]),
                 fill=_shade(skirting, 0.85))
    draw.line(_pts([(WALL_X0, WALL_TOP), (WALL_X0, WALL_BOTTOM)]), fill=_shade(w, 0.7), width=SS)
    draw.line(_pts([(WALL_X1, WALL_TOP), (WALL_X1, WALL_BOTTOM)]), fill=_shade(w, 0.7), width=SS)
    return img


@lru_cache(maxsize=1)
def _lighting() -> Image.Image:
    """A multiply layer: a gentle vignette, brightest in the upper middle."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    f = 1.0 - 0.32 * (((x - 128) / 160) ** 2 + ((y - 100) / 190) ** 2)
    v = np.clip(255 * f, 0, 255).astype(np.uint8)
    blue = np.minimum(v.astype(np.uint16) + 3, 255).astype(np.uint8)
    return Image.fromarray(np.dstack([v, v, blue]), "RGB")


@lru_cache(maxsize=1)
def _sky() -> Image.Image:
    """A sky gradient for window panes."""
    size = SIZE * SS
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    top, bottom = (120, 170, 226), (214, 232, 246)
    for y in range(0, size, 2):
        t = y / size
        draw.line([(0, y), (size, y + 1)], fill=_mix(top, bottom, min(1.0, t * 2.6 % 1.6)), width=2)
    return img


# ---------------------------------------------------------------- drawing helpers


class _Canvas:
    def __init__(self, img: Image.Image):
        self.img = img
        self.draw = ImageDraw.Draw(img, "RGBA")

    def shape(self, kind: str, coords: list, colour: Colour, pattern: str = "plain",
              outline: Colour | None = None, width: float = 1.0) -> None:
        """Fill a polygon/rectangle/ellipse with a colour and pattern, then outline it."""
        scaled = _pts(coords) if kind == "polygon" else _box(*coords)
        getattr(self.draw, kind)(scaled, fill=colour)
        if pattern != "plain":
            xs = [p[0] for p in scaled] if kind == "polygon" else [scaled[0], scaled[2]]
            ys = [p[1] for p in scaled] if kind == "polygon" else [scaled[1], scaled[3]]
            x0, y0 = int(max(0, min(xs))), int(max(0, min(ys)))
            x1, y1 = int(min(SIZE * SS, max(xs) + 1)), int(min(SIZE * SS, max(ys) + 1))
            if x1 > x0 and y1 > y0:
                mask = Image.new("L", (x1 - x0, y1 - y0), 0)
                md = ImageDraw.Draw(mask)
                if kind == "polygon":
                    md.polygon([(x - x0, y - y0) for x, y in scaled], fill=255)
                else:
                    getattr(md, kind)([scaled[0] - x0, scaled[1] - y0, scaled[2] - x0, scaled[3] - y0], fill=255)
                self.img.paste(_pattern_sheet(pattern, colour).crop((x0, y0, x1, y1)), (x0, y0), mask)
        if outline is not None:
            getattr(self.draw, kind)(scaled, outline=outline, width=max(1, int(width * SS)))

    def poly(self, points: list[tuple[float, float]], fill: Any, outline: Any = None, width: float = 1.0) -> None:
        self.draw.polygon(_pts(points), fill=fill, outline=outline, width=max(1, int(width * SS)))

    def rect(self, x0: float, y0: float, x1: float, y1: float, fill: Any, outline: Any = None, width: float = 1.0) -> None:
        self.draw.rectangle(_box(x0, y0, x1, y1), fill=fill, outline=outline, width=max(1, int(width * SS)))

    def rrect(self, x0: float, y0: float, x1: float, y1: float, r: float, fill: Any, outline: Any = None,
              width: float = 1.0) -> None:
        self.draw.rounded_rectangle(_box(x0, y0, x1, y1), radius=r * SS, fill=fill, outline=outline,
                                    width=max(1, int(width * SS)))

    def ellipse(self, x0: float, y0: float, x1: float, y1: float, fill: Any, outline: Any = None,
                width: float = 1.0) -> None:
        self.draw.ellipse(_box(x0, y0, x1, y1), fill=fill, outline=outline, width=max(1, int(width * SS)))

    def line(self, points: list[tuple[float, float]], fill: Any, width: float = 1.0) -> None:
        self.draw.line(_pts(points), fill=fill, width=max(1, int(width * SS)))


SHADOW = (0, 0, 0, 46)
WOOD = (96, 64, 42)
METAL = (70, 70, 76)


# ---------------------------------------------------------------- wall objects (x, y = centre)


def _window(cv: _Canvas, x: float, y: float, s: float, c: Colour, pattern: str) -> None:
    w, h = 40 * s, 54 * s
    x0, y0, x1, y1 = x - w / 2, y - h / 2, x + w / 2, y + h / 2
    cv.rect(x0 + 2, y0 + 2, x1 + 2, y1 + 4, SHADOW)
    cv.img.paste(_sky().crop(tuple(int(v) for v in _box(x0, y0, x1, y1))), (int(x0 * SS), int(y0 * SS)))
    # distant hills and a soft glare make the pane read as outdoors
    cv.poly([(x0, y1 - 12 * s), (x - 6 * s, y1 - 20 * s), (x + 8 * s, y1 - 14 * s), (x1, y1 - 18 * s), (x1, y1), (x0, y1)],
            (112, 160, 110))
    cv.poly([(x0 + 4 * s, y1), (x1 - 10 * s, y0), (x1 - 2 * s, y0), (x0 + 12 * s, y1)], (255, 255, 255, 50))
    frame = max(2.5, 4.6 * s)  # thick, so the window's colour survives downscaling
    cv.rect(x0, y0, x1, y1, None, outline=c, width=frame)
    cv.rect(x0, y0, x1, y1, None, outline=_outline(c), width=0.6)
    cv.line([(x, y0), (x, y1)], c, width=frame * 0.7)
    cv.line([(x0, y - 2 * s), (x1, y - 2 * s)], c, width=frame * 0.7)
    cv.rect(x0 - 3 * s, y1, x1 + 3 * s, y1 + 4 * s, _mix(c, (255, 255, 255), 0.2), outline=_outline(c), width=0.6)


def _curtains(cv: _Canvas, x: float, y: float, s: float, c: Colour, pattern: str) -> None:
    half = 30 * s
    top, bottom = 26.0, 26.0 + 104 * (0.7 + 0.3 * s)
    edge = _outline(c)
    for side in (-1, 1):
        inner = x + side * 3 * s
        outer = x + side * half
        drape = [(min(inner, outer), top + 2), (max(inner, outer), top + 2),
                 (max(inner, outer) + (2 if side > 0 else -8) * s, bottom),
                 (min(inner, outer) + (8 if side > 0 else -2) * s, bottom)]
        cv.poly([(px + 2, py + 2) for px, py in drape], SHADOW)
        cv.shape("polygon", drape, c, pattern, outline=edge, width=0.8)
        for k in (0.3, 0.55, 0.8):  # folds
            fx = inner + (outer - inner) * k
            cv.line([(fx, top + 4), (fx + side * 3 * s * k, bottom - 1)], (0, 0, 0, 40), width=1.6 * s + 0.4)
    cv.line([(x - half - 5, top), (x + half + 5, top)], METAL, width=2)
    cv.ellipse(x - half - 7, top - 2, x - half - 3, top + 2, METAL)
    cv.ellipse(x + half + 3, top - 2, x + half + 7, top + 2, METAL)


def _painting(cv: _Canvas, x: float, y: float, s: float, c: Colour, pattern: str) -> None:
    w, h = 44 * s, 32 * s
    x0, y0, x1, y1 = x - w / 2, y - h / 2, x + w / 2, y + h / 2
    cv.rect(x0 + 2, y0 + 2, x1 + 2, y1 + 3, SHADOW)
    frame = (186, 150, 76)
    cv.rect(x0, y0, x1, y1, frame, outline=_shade(frame, 0.6), width=0.8)
    m = max(2.0, 3.4 * s)
    if pattern == "plain":  # a small landscape in the painting's colour
        cv.rect(x0 + m, y0 + m, x1 - m, y1 - m, _mix(c, (255, 255, 255), 0.45))
        cv.ellipse(x + 4 * s, y0 + m + 3 * s, x + 11 * s, y0 + m + 10 * s, _mix(c, (255, 255, 255), 0.8))
        cv.poly([(x0 + m, y1 - m), (x0 + m, y + 2 * s), (x - 6 * s, y - 5 * s), (x + 6 * s, y + 3 * s),
                 (x1 - m, y - 3 * s), (x1 - m, y1 - m)], c)
        cv.poly([(x0 + m, y1 - m), (x0 + m, y + 8 * s), (x + 2 * s, y + 6 * s), (x1 - m, y + 10 * s), (x1 - m, y1 - m)],
                _shade(c, 0.72))
    else:
        cv.shape("rectangle", [x0 + m, y0 + m, x1 - m, y1 - m], c, pattern)
    cv.rect(x0 + m, y0 + m, x1 - m, y1 - m, None, outline=_shade(frame, 0.55), width=0.6)


def _mirror(cv: _Canvas, x: float, y: float, s: float, c: Colour, pattern: str) -> None:
    w, h = 30 * s, 44 * s
    x0, y0, x1, y1 = x - w / 2, y - h / 2, x + w / 2, y + h / 2
    cv.ellipse(x0 + 2, y0 + 2, x1 + 2, y1 + 3, SHADOW)
    cv.ellipse(x0, y0, x1, y1, c, outline=_outline(c), width=0.8)
    m = max(2.5, 5.0 * s)
    cv.ellipse(x0 + m, y0 + m, x1 - m, y1 - m, (206, 220, 228), outline=_shade(c, 0.7), width=0.6)
    cv.ellipse(x0 + m + 2 * s, y0 + m + 2 * s, x - 2 * s, y - 6 * s, (236, 244, 248, 150))
    cv.line([(x - 6 * s, y + 10 * s), (x + 5 * s, y - 8 * s)], (255, 255, 255, 120), width=1.5 * s + 0.5)


def _clock(cv: _Canvas, x: float, y: float, s: float, c: Colour, pattern: str) -> None:
    y = 46.0  # clocks hang high on the wall
    r = 13 * s
    cv.ellipse(x - r + 2, y - r + 2, x + r + 2, y + r + 3, SHADOW)
    cv.ellipse(x - r, y - r, x + r, y + r, c, outline=_outline(c), width=0.8)
    f = r * 0.74
    face = _mix(c, (250, 248, 240), 0.45)  # tinted, so the clock's colour reads at a glance
    hands = (30, 30, 30) if _luma(face) > 110 else (245, 245, 240)
    cv.ellipse(x - f, y - f, x + f, y + f, face)
    for k in range(12):
        a = k * math.pi / 6
        cv.line([(x + math.cos(a) * f * 0.78, y + math.sin(a) * f * 0.78),
                 (x + math.cos(a) * f * 0.92, y + math.sin(a) * f * 0.92)], hands, width=0.8)
    cv.line([(x, y), (x - f * 0.45, y - f * 0.3)], hands, width=1.2 * s + 0.4)
    cv.line([(x, y), (x + f * 0.55, y - f * 0.5)], hands, width=0.9 * s + 0.3)
    cv.ellipse(x - 1, y - 1, x + 1, y + 1, hands)


def _tv(cv: _Canvas, x: float, y: float, s: float, c: Colour, pattern: str) -> None:
    w, h = 56 * s, 34 * s
    x0, y0, x1, y1 = x - w / 2, y - h / 2 + 6, x + w / 2, y + h / 2 + 6
    cv.rect(x0 + 2, y0 + 2, x1 + 2, y1 + 3, SHADOW)
    cv.rrect(x0, y0, x1, y1, 1.5, c, outline=_outline(c), width=0.8)
    m = max(2.5, 4.2 * s)
    cv.rect(x0 + m, y0 + m, x1 - m, y1 - m, (28, 32, 44))
    cv.poly([(x0 + m, y1 - m), (x0 + m + 10 * s, y0 + m), (x0 + m + 20 * s, y0 + m), (x0 + m + 10 * s, y1 - m)],
            (255, 255, 255, 26))
    cv.ellipse(x1 - m - 2, y1 - 2, x1 - m, y1 - 0.5, (90, 220, 120))


# ---------------------------------------------------------------- floor objects (x = centre)


def _floor_shadow(cv: _Canvas, x: float, y: float, w: float, h: float) -> None:
    cv.ellipse(x - w / 2, y - h / 2, x + w / 2, y + h / 2, (0, 0, 0, 56))


def _bed(cv: _Canvas, x: float, y: float, s: float, c: Colour, pattern: str) -> None:
    back, depth = 152.0, 54 * s
    front = back + depth
    wb, wf = 62 * s, 74 * s  # half-widths... full widths at the back and the front edge
    _floor_shadow(cv, x + 2, front + 6 * s, wf * 1.1, 10 * s)
    head_top = back - 34 * s
    cv.rrect(x - wb / 2 - 2 * s, head_top, x + wb / 2 + 2 * s, back + 6, 3 * s, WOOD, outline=_shade(WOOD, 0.6),
             width=0.8)
    cv.rrect(x - wb / 2 + 3 * s, head_top + 4 * s, x + wb / 2 - 3 * s, back, 2 * s, _shade(WOOD, 1.25))
    # mattress: white sheet (top face) and frame (front face)
    sheet = (244, 242, 236)
    cv.poly([(x - wb / 2, back), (x + wb / 2, back), (x + wf / 2, front), (x - wf / 2, front)], sheet,
            outline=(180, 178, 170), width=0.6)
    for side in (-1, 1):  # pillows
        px = x + side * wb * 0.24
        cv.rrect(px - wb * 0.2, back + 2 * s, px + wb * 0.2, back + 12 * s, 4 * s, (252, 252, 250),
                 outline=(196, 194, 188), width=0.6)
    blanket_back = back + depth * 0.34
    bw = wb + (wf - wb) * 0.34
    blanket = [(x - bw / 2 - 1, blanket_back), (x + bw / 2 + 1, blanket_back), (x + wf / 2 + 1, front),
               (x - wf / 2 - 1, front)]
    cv.shape("polygon", blanket, c, pattern)
    cv.line([(x - bw / 2 - 1, blanket_back), (x + bw / 2 + 1, blanket_back)], _mix(c, (255, 255, 255), 0.35),
            width=2 * s)
    # the blanket hangs over the front edge, shaded
    drop = 12 * s
    cv.shape("polygon", [(x - wf / 2 - 1, front), (x + wf / 2 + 1, front), (x + wf / 2 + 1, front + drop),
                         (x - wf / 2 - 1, front + drop)], _shade(c, 0.8), pattern)
    cv.rect(x - wf / 2 - 1, front, x + wf / 2 + 1, front + drop, (0, 0, 0, 34))
    cv.poly([(x - wf / 2 - 1, front), (x + wf / 2 + 1, front), (x + wf / 2 + 1, front + drop),
             (x - wf / 2 - 1, front + drop)], None, outline=_outline(c), width=0.6)
    cv.poly(blanket, None, outline=_outline(c), width=0.6)
    cv.rect(x - wf / 2 + 1, front + drop, x - wf / 2 + 4 * s, front + drop + 4 * s, WOOD)
    cv.rect(x + wf / 2 - 4 * s, front + drop, x + wf / 2 - 1, front + drop + 4 * s, WOOD)


def _nightstand(cv: _Canvas, x: float, y: float, s: float, c: Colour, pattern: str) -> None:
    base = 176.0
    w, h, d = 30 * s, 28 * s, 6 * s
    _floor_shadow(cv, x + 2, base, w * 1.2, 6 * s)
    cv.poly([(x - w / 2, base - h), (x - w / 2 + d * 0.6, base - h - d), (x + w / 2 - d * 0.6, base - h - d),
             (x + w / 2, base - h)], _mix(c, (255, 255, 255), 0.22), outline=_outline(c), width=0.6)
    cv.rect(x - w / 2, base - h, x + w / 2, base - 3 * s, c, outline=_outline(c), width=0.7)
    for k in (0, 1):
        dy0 = base - h + 3 * s + k * (h - 6 * s) / 2
        dy1 = dy0 + (h - 6 * s) / 2 - 2 * s
        cv.rect(x - w / 2 + 3 * s, dy0, x + w / 2 - 3 * s, dy1, _shade(c, 0.9), outline=_outline(c), width=0.5)
        cv.ellipse(x - 1.5 * s, (dy0 + dy1) / 2 - 1.5 * s, x + 1.5 * s, (dy0 + dy1) / 2 + 1.5 * s, (210, 190, 120))
    cv.rect(x - w / 2 + 1, base - 3 * s, x - w / 2 + 3 * s, base, _shade(c, 0.6))
    cv.rect(x + w / 2 - 3 * s, base - 3 * s, x + w / 2 - 1, base, _shade(c, 0.6))


def _chair(cv: _Canvas, x: float, y: float, s: float, c: Colour, pattern: str) -> None:
    base = 200.0
    edge = _outline(c)
    _floor_shadow(cv, x + 2, base, 44 * s, 8 * s)
    for lx in (-15, 13):
        cv.rect(x + lx * s, base - 7 * s, x + (lx + 2.5) * s, base, WOOD)
    cv.shape("rectangle", [x - 16 * s, base - 52 * s, x + 16 * s, base - 22 * s], c, pattern, outline=edge, width=0.7)
    cv.rect(x - 16 * s, base - 52 * s, x + 16 * s, base - 46 * s, (255, 255, 255, 36))
    cv.shape("polygon", [(x - 17 * s, base - 24 * s), (x + 17 * s, base - 24 * s), (x + 19 * s, base - 14 * s),
                         (x - 19 * s, base - 14 * s)], _mix(c, (255, 255, 255), 0.15), pattern, outline=edge, width=0.7)
    cv.rect(x - 19 * s, base - 14 * s, x + 19 * s, base - 7 * s, _shade(c, 0.72), outline=edge, width=0.7)
    for side in (-1, 1):
        ax = x + side * 19 * s
        cv.rrect(min(ax, ax - side * 6 * s), base - 33 * s, max(ax, ax - side * 6 * s), base - 7 * s, 2 * s,
                 _shade(c, 0.86), outline=edge, width=0.7)


def _plant(cv: _Canvas, x: float, y: float, s: float, c: Colour, pattern: str) -> None:
    base = 198.0
    _floor_shadow(cv, x + 2, base, 28 * s, 6 * s)
    leaf, dark = (70, 140, 70), (44, 102, 52)
    top = base - 24 * s
    for k, (dx, h, w) in enumerate([(-12, 38, 8), (12, 40, 8), (-6, 54, 8), (6, 52, 8), (0, 62, 9), (-16, 26, 7),
                                    (16, 28, 7)]):
        tipx, tipy = x + dx * s * 1.3, top - h * s
        colour = leaf if k % 2 else dark
        cv.poly([(x - 2 * s, top), (tipx - w * s / 2, (top + tipy) / 2), (tipx, tipy),
                 (tipx + w * s / 2, (top + tipy) / 2), (x + 2 * s, top)], colour, outline=(30, 70, 36), width=0.5)
    pot = [(x - 12 * s, top), (x + 12 * s, top), (x + 9 * s, base), (x - 9 * s, base)]
    cv.shape("polygon", pot, c, pattern, outline=_outline(c), width=0.7)
    cv.rect(x - 13 * s, top - 3 * s, x + 13 * s, top + 1 * s, _mix(c, (255, 255, 255), 0.18), outline=_outline(c),
            width=0.6)


def _lamp(cv: _Canvas, x: float, y: float, s: float, c: Colour, pattern: str) -> None:
    base = 190.0
    height = 96 * s
    shade_top, shade_bottom = base - height, base - height + 22 * s
    cv.ellipse(x - 22 * s, shade_bottom - 14 * s, x + 22 * s, shade_bottom + 22 * s, (255, 236, 170, 42))
    _floor_shadow(cv, x + 2, base, 22 * s, 5 * s)
    cv.line([(x, shade_bottom), (x, base - 2)], METAL, width=1.6)
    cv.ellipse(x - 8 * s, base - 3 * s, x + 8 * s, base + 1, METAL)
    cv.ellipse(x - 6 * s, shade_bottom - 3 * s, x + 6 * s, shade_bottom + 5 * s, (255, 244, 200))
    cv.shape("polygon", [(x - 8 * s, shade_top), (x + 8 * s, shade_top), (x + 13 * s, shade_bottom),
                         (x - 13 * s, shade_bottom)], c, pattern, outline=_outline(c), width=0.7)


def _rug(cv: _Canvas, x: float, y: float, s: float, c: Colour, pattern: str) -> None:
    cy = 233.0  # in front of the furniture, so a bed does not hide it
    wb, wf, d = 84 * s, 104 * s, 28 * s
    quad = [(x - wb / 2, cy - d / 2), (x + wb / 2, cy - d / 2), (x + wf / 2, cy + d / 2), (x - wf / 2, cy + d / 2)]
    cv.poly([(px + 1, py + 2) for px, py in quad], (0, 0, 0, 40))
    cv.shape("polygon", quad, c, pattern)
    inset = [(x - wb / 2 + 5 * s, cy - d / 2 + 3 * s), (x + wb / 2 - 5 * s, cy - d / 2 + 3 * s),
             (x + wf / 2 - 6 * s, cy + d / 2 - 3 * s), (x - wf / 2 + 6 * s, cy + d / 2 - 3 * s)]
    cv.poly(inset, None, outline=_contrast(c), width=1.2)
    cv.poly(quad, None, outline=_outline(c), width=0.8)
    fringe = _mix(c, (255, 255, 255), 0.55)
    for k in range(int(14 * s) + 1):
        t = k / max(1, int(14 * s))
        fx = x - wf / 2 + 2 + t * (wf - 4)
        cv.line([(fx, cy + d / 2), (fx, cy + d / 2 + 3)], fringe, width=0.6)


DRAW: dict[str, Callable[..., None]] = {
    "window": _window, "curtains": _curtains, "painting": _painting, "mirror": _mirror, "clock": _clock, "tv": _tv,
    "bed": _bed, "nightstand": _nightstand, "chair": _chair, "plant": _plant, "lamp": _lamp, "rug": _rug,
}

# Width of one large copy (for fitting several copies into a slot) and wall centre height.
_WIDTH = {"window": 46, "curtains": 66, "painting": 48, "mirror": 32, "clock": 28, "tv": 58,
          "bed": 76, "nightstand": 32, "chair": 40, "plant": 30, "lamp": 28, "rug": 104}
_WALL_Y = {"window": 76.0, "curtains": 0.0, "painting": 74.0, "mirror": 76.0, "clock": 46.0, "tv": 78.0}
# Drawing scale per kind, so that furniture reads at the room's scale.
_KIND_SCALE = {"window": 1.4, "curtains": 1.15, "painting": 1.35, "mirror": 1.35, "clock": 1.2, "tv": 1.25,
               "bed": 1.1, "nightstand": 1.45, "chair": 1.45, "plant": 1.35, "lamp": 1.1, "rug": 1.0}
# Floor objects drawn back to front.
_DEPTH_ORDER = {"rug": 0, "nightstand": 1, "lamp": 2, "plant": 3, "chair": 4, "bed": 5}


def _copies(obj: dict[str, Any]) -> list[tuple[float, float]]:
    """(x, scale) of each copy: side by side, squeezed to the slot as a large copy would be.

    The squeeze is computed from the large width so that small copies always stay
    smaller than large ones: a resize edit always shows.
    """
    kind, n = obj["kind"], obj["count"]
    wall = LAYER[kind] == "wall"
    slot_x = (WALL_SLOT_X if wall else FLOOR_SLOT_X)[obj["position"]]
    slot_w = WALL_SLOT_WIDTH if wall else FLOOR_SLOT_WIDTH
    gap = 4.0
    width = _WIDTH[kind] * _KIND_SCALE[kind]
    fit = 1.0 if n == 1 else min(1.0, (slot_w + 14 * (n - 1)) / (n * width + (n - 1) * gap))
    scale = SIZE_SCALE[obj["size"]] * fit * _KIND_SCALE[kind]
    step = (width * fit + gap) if n > 1 else 0.0
    if n > 1 and not wall:
        step = width * fit * 0.86 + gap  # floor copies may overlap a little
    return [(slot_x + (i - (n - 1) / 2) * step, scale) for i in range(n)]


def _window_light(cv: _Canvas, obj: dict[str, Any]) -> None:
    """Sunlight from a window falls on the floor in front of it."""
    for x, s in _copies(obj):
        w = 40 * s
        cv.poly([(x - w / 2 + 6, 156), (x + w / 2 + 6, 156), (x + w / 2 + 46, 250), (x - w / 2 + 26, 250)],
                (255, 246, 214, 40))


def render_scene(scene: dict[str, Any]) -> Image.Image:
    """The scene as a 256x256 RGB image."""
    img = _room(scene["wall"], scene["floor"]).copy()
    cv = _Canvas(img)
    objects = scene["objects"]
    for obj in objects:
        if obj["kind"] == "window":
            _window_light(cv, obj)
    wall_objects = [o for o in objects if LAYER[o["kind"]] == "wall"]
    floor_objects = sorted((o for o in objects if LAYER[o["kind"]] != "wall"), key=lambda o: _DEPTH_ORDER[o["kind"]])
    # curtains hang in front of nothing else on the wall but are drawn first so that any
    # overlap from a neighbouring slot's painting reads as the painting being nearer
    for obj in sorted(wall_objects, key=lambda o: o["kind"] != "curtains"):
        rgb = COLOUR_RGB[obj["colour"]]
        for x, s in _copies(obj):
            DRAW[obj["kind"]](cv, x, _WALL_Y[obj["kind"]], s, rgb, obj["pattern"])
    for obj in floor_objects:
        rgb = COLOUR_RGB[obj["colour"]]
        for x, s in _copies(obj):
            DRAW[obj["kind"]](cv, x, 0.0, s, rgb, obj["pattern"])
    small = img.reduce(SS)
    return ImageChops.multiply(small, _lighting())


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def encode_png(img: Image.Image, level: int = 1) -> bytes:
    """An 8-bit RGB PNG with the Sub filter on every row.

    About twice as fast as Pillow's encoder at a similar size: Pillow tries every filter on
    every row, while rendered rooms are flat colour, where Sub alone does well.
    """
    rgb = np.asarray(img.convert("RGB"))
    height, width = rgb.shape[:2]
    rows = rgb.reshape(height, width * 3)
    filtered = np.empty((height, 1 + width * 3), np.uint8)
    filtered[:, 0] = 1  # filter type Sub: each byte minus the byte one pixel to the left
    filtered[:, 1:4] = rows[:, :3]
    filtered[:, 4:] = rows[:, 3:] - rows[:, :-3]  # uint8 arithmetic wraps mod 256, as PNG wants
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(filtered.tobytes(), level)) + _chunk(b"IEND", b""))


def render_png(scene: dict[str, Any], level: int = 1) -> bytes:
    """The scene rendered and encoded as PNG bytes (deterministic for equal scenes)."""
    return encode_png(render_scene(scene), level)
