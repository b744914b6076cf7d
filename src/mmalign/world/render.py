"""Deterministic Pillow renderer of shapes-world scenes.

Each object is drawn in its grid cell — large objects fill ~90 % of the cell side, small ones ~60 % (a
tiny 16-px-patch vision tower tells shapes apart much sooner than at 40 %: measured in docs/RESULTS.md) —
with flat colours and no anti-aliasing, so the pixel at a cell's centre is exactly the object colour.
The written word (if any) is drawn in a contrasting colour centred on the first row boundary, where it
never covers a cell centre.
"""

from __future__ import annotations

import math
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from mmalign.world.scene import CELLS_2X2, CELLS_3X3, Scene, SceneObject

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
}
TEXT_RGB: dict[str, tuple[int, int, int]] = {
    "white": (0, 0, 0),
    "gray": (255, 255, 255),
    "black": (255, 255, 255),
}
SIZE_FRACTION: dict[str, float] = {"small": 0.6, "large": 0.9}
"""Object side as a fraction of the cell side."""


def cell_box(cell: str, grid: int, size: int) -> tuple[float, float, float, float]:
    """Pixel box ``(x0, y0, x1, y1)`` of a named cell."""
    cells = CELLS_2X2 if grid == 2 else CELLS_3X3
    k = cells.index(cell)
    row, col = divmod(k, grid)
    side = size / grid
    return col * side, row * side, (col + 1) * side, (row + 1) * side


def cell_center(cell: str, grid: int, size: int) -> tuple[int, int]:
    """Integer pixel at the centre of a cell."""
    x0, y0, x1, y1 = cell_box(cell, grid, size)
    return int((x0 + x1) / 2), int((y0 + y1) / 2)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Outline of a polygonal shape of half-side ``r`` centred at ``(cx, cy)``."""
    if shape == "triangle":  # apex up; the centre is well inside
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "star":  # 5 points, inner radius 0.45 r
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    if shape == "cross":  # plus sign with arms 0.35 r wide on each side
        w = 0.35 * r
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    raise ValueError(f"render: shape: no polygon for {shape!r}")


def draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, grid: int, size: int) -> None:
    """Draw one object into its cell."""
    x0, y0, x1, y1 = cell_box(obj.cell, grid, size)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    try:
        r = (x1 - x0) * SIZE_FRACTION[obj.size] / 2
        fill = COLOR_RGB[obj.color]
    except KeyError as err:
        raise ValueError(f"render: object: unknown size or colour in {obj}") from err
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "heart":  # two lobes and a point
        lobe = r * 0.55
        draw.ellipse((cx - r, cy - r * 0.8, cx - r + 2 * lobe, cy - r * 0.8 + 2 * lobe), fill=fill)
        draw.ellipse((cx + r - 2 * lobe, cy - r * 0.8, cx + r, cy - r * 0.8 + 2 * lobe), fill=fill)
        draw.polygon([(cx - r, cy - r * 0.25), (cx + r, cy - r * 0.25), (cx, cy + r)], fill=fill)
    else:
        draw.polygon(_polygon(obj.shape, cx, cy, r), fill=fill)


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def render(scene: Scene, size: int | None = None) -> Image.Image:
    """RGB image of ``scene`` (``size`` px square; default 64)."""
    side = size or 64
    try:
        bg = BACKGROUND_RGB[scene.background]
    except KeyError as err:
        raise ValueError(f"render: background: unknown {scene.background!r}") from err
    image = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        draw_object(draw, obj, scene.grid, side)
    if scene.text:
        draw.text(
            (side / 2, side / scene.grid),
            scene.text,
            fill=TEXT_RGB[scene.background],
            font=_font(),
            anchor="mm",
        )
    return image
