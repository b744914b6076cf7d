"""Scenes of the shapes world: objects on a grid, a background and an optional written word.

A scene is fully reproducible from ``(seed, index)`` and a ``WorldConfig``; generation needs no files.
Every other part of the world (renderer, grammar, questions, oracle) works from these types.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

SHAPES_ALL = ("circle", "square", "triangle", "star", "cross", "heart")
COLORS_ALL = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
BACKGROUNDS = ("white", "gray", "black")
WORDS = ("cat", "sun", "box", "tree", "moon", "fish")
CELLS_2X2 = ("top left", "top right", "bottom left", "bottom right")
CELLS_3X3 = (
    "top left", "top center", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom center", "bottom right",
)  # fmt: skip


@dataclass(frozen=True)
class WorldConfig:
    """Knobs of the shapes world (defaults: the calibrated demo world)."""

    grid: int = 2
    """2 (cells top left … bottom right) or 3 (adds center / middle / … cells)."""
    image_size: int = 64
    """Rendered image side in pixels (64–96)."""
    n_shapes: int = 4
    """How many of SHAPES_ALL are used (≥ 4)."""
    n_colors: int = 4
    """How many of COLORS_ALL are used."""
    min_objects: int = 1
    max_objects: int = 3
    text_prob: float = 0.25
    """Probability that a scene shows a written word."""

    def __post_init__(self) -> None:
        if self.grid not in (2, 3):
            raise ValueError(f"grid must be 2 or 3, got {self.grid}")
        if not 4 <= self.n_shapes <= len(SHAPES_ALL):
            raise ValueError(f"n_shapes must be in 4..{len(SHAPES_ALL)}, got {self.n_shapes}")
        if not 2 <= self.n_colors <= len(COLORS_ALL):
            raise ValueError(f"n_colors must be in 2..{len(COLORS_ALL)}, got {self.n_colors}")
        if not 1 <= self.min_objects <= self.max_objects <= len(self.cells):
            raise ValueError("need 1 <= min_objects <= max_objects <= number of cells")

    @property
    def shapes(self) -> tuple[str, ...]:
        return SHAPES_ALL[: self.n_shapes]

    @property
    def colors(self) -> tuple[str, ...]:
        return COLORS_ALL[: self.n_colors]

    @property
    def cells(self) -> tuple[str, ...]:
        return CELLS_2X2 if self.grid == 2 else CELLS_3X3


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    cell: str


@dataclass(frozen=True)
class Scene:
    """Objects (at most one per cell, sorted in reading order of cells), background, optional word."""

    objects: tuple[SceneObject, ...]
    background: str = "white"
    text: str | None = None
    grid: int = 2
    seed: int = 0
    index: int = 0
    meta: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def shapes(self) -> set[str]:
        return {o.shape for o in self.objects}

    def count(self, shape: str | None = None, color: str | None = None) -> int:
        return sum(
            (shape is None or o.shape == shape) and (color is None or o.color == color) for o in self.objects
        )

    def find(self, shape: str) -> list[SceneObject]:
        return [o for o in self.objects if o.shape == shape]

    def to_dict(self) -> dict[str, object]:
        return {
            "objects": [vars(o) for o in self.objects],
            "background": self.background,
            "text": self.text,
            "grid": self.grid,
            "seed": self.seed,
            "index": self.index,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Scene:
        objs = tuple(SceneObject(**o) for o in d["objects"])  # type: ignore[attr-defined]
        return cls(
            objects=objs,
            background=str(d.get("background", "white")),
            text=d.get("text"),  # type: ignore[arg-type]
            grid=int(d.get("grid", 2)),  # type: ignore[call-overload]
            seed=int(d.get("seed", 0)),  # type: ignore[call-overload]
            index=int(d.get("index", 0)),  # type: ignore[call-overload]
        )


def make_scene(seed: int, index: int, config: WorldConfig | None = None) -> Scene:
    """The scene number ``index`` of the stream ``seed`` (deterministic, independent of other indices)."""
    cfg = config or WorldConfig()
    rng = random.Random(f"mmalign-scene-{seed}-{index}")
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    cells = sorted(rng.sample(range(len(cfg.cells)), n))
    objects = tuple(
        SceneObject(
            shape=rng.choice(cfg.shapes),
            color=rng.choice(cfg.colors),
            size=rng.choice(SIZES),
            cell=cfg.cells[c],
        )
        for c in cells
    )
    background = rng.choice(BACKGROUNDS)
    text = rng.choice(WORDS) if rng.random() < cfg.text_prob else None
    return Scene(objects=objects, background=background, text=text, grid=cfg.grid, seed=seed, index=index)
