from __future__ import annotations

import io
import time

import pytest

from mmalign.world.render import BACKGROUND_RGB, COLOR_RGB, cell_box, cell_center, render
from mmalign.world.scene import CELLS_3X3, SHAPES_ALL, Scene, SceneObject, WorldConfig, make_scene


def _png(scene: Scene, size: int = 64) -> bytes:
    buf = io.BytesIO()
    render(scene, size).save(buf, format="PNG")
    return buf.getvalue()


def test_rendering_is_deterministic_to_the_byte() -> None:
    scene = make_scene(3, 17, WorldConfig(n_shapes=6, n_colors=6))
    assert _png(scene) == _png(scene)


@pytest.mark.parametrize("shape", SHAPES_ALL)
@pytest.mark.parametrize("size", ["small", "large"])
def test_cell_centre_pixel_is_the_object_colour_for_every_shape(shape: str, size: str) -> None:
    scene = Scene((SceneObject(shape, "purple", size, "bottom right"),), background="white", text="moon")
    image = render(scene, 64)
    assert image.getpixel(cell_center("bottom right", 2, 64)) == COLOR_RGB["purple"]
    assert image.getpixel((2, 2)) == BACKGROUND_RGB["white"]  # empty top-left corner


def test_every_cell_centre_of_a_full_3x3_grid_has_its_object_colour_even_with_a_word() -> None:
    colors = list(COLOR_RGB)
    objs = tuple(SceneObject(SHAPES_ALL[k % 6], colors[k % 6], "small", c) for k, c in enumerate(CELLS_3X3))
    scene = Scene(objs, background="black", text="tree", grid=3)
    image = render(scene, 96)
    for obj in objs:
        assert image.getpixel(cell_center(obj.cell, 3, 96)) == COLOR_RGB[obj.color]


def test_large_objects_cover_far_more_pixels_than_small_ones() -> None:
    def covered(size: str) -> int:
        image = render(Scene((SceneObject("square", "red", size, "top left"),), background="gray"), 64)
        return sum(px == COLOR_RGB["red"] for px in image.getdata())

    # 32-px cell: small side 0.6 · 32 ≈ 19 px, large 0.9 · 32 ≈ 29 px (inclusive pixel bounds)
    assert (covered("small"), covered("large")) == (20 * 20, 30 * 30)


def test_background_fills_empty_space_for_each_background() -> None:
    for bg, rgb in BACKGROUND_RGB.items():
        image = render(Scene((SceneObject("circle", "red", "small", "top left"),), background=bg), 64)
        assert image.getpixel((48, 48)) == rgb


def test_the_word_is_drawn_when_present_and_not_otherwise() -> None:
    objs = (SceneObject("circle", "red", "small", "top left"),)
    plain = render(Scene(objs, background="white"), 64)
    worded = render(Scene(objs, background="white", text="cat"), 64)
    diff = sum(a != b for a, b in zip(plain.getdata(), worded.getdata(), strict=True))
    assert diff > 20


def test_cell_boxes_tile_the_image() -> None:
    assert cell_box("top left", 2, 64) == (0, 0, 32, 32)
    assert cell_box("bottom right", 2, 64) == (32, 32, 64, 64)
    assert cell_center("center", 3, 96) == (48, 48)


def test_unknown_colour_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown size or colour"):
        render(Scene((SceneObject("circle", "pink", "small", "top left"),)), 64)


def test_scene_generation_is_fast() -> None:
    start = time.perf_counter()
    for i in range(1000):
        make_scene(0, i)
    assert time.perf_counter() - start < 1.0
