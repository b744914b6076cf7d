"""Co-occurrence prior of the shapes world — the analogue of COCO's fork → knife.

Some shapes (and colour/shape pairs) "go together". The prior is used to make realistic
hallucinations (an SFT corpus that mentions the partner of a present shape) and to choose POPE
negatives: *popular* ones (globally frequent shapes) and *adversarial* ones (shapes that co-occur
with what is present).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from mmalign.world.scene import SHAPES_ALL, Scene

DEFAULT_SHAPE_PAIRS: dict[str, str] = {"circle": "triangle", "square": "star", "cross": "heart"}
"""shape → the shape that co-occurs with it."""
DEFAULT_COLOR_PAIRS: dict[str, str] = {
    "red": "square",
    "blue": "circle",
    "green": "triangle",
    "yellow": "star",
}
"""colour → the shape that co-occurs with objects of that colour."""


@dataclass
class CooccurrencePrior:
    """Directed co-occurrence strengths between shapes (and from colours to shapes)."""

    shapes: tuple[str, ...] = SHAPES_ALL[:4]
    """The shape universe negatives are drawn from."""
    shape_pairs: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SHAPE_PAIRS))
    color_pairs: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_COLOR_PAIRS))
    pair_strength: float = 1.0
    """Co-occurrence score of a listed shape pair (unlisted pairs score 0)."""
    color_strength: float = 0.5
    """Co-occurrence score contributed by each object whose colour is paired with a shape."""

    def partner(self, shape: str) -> str | None:
        """The shape that co-occurs with ``shape`` (None when it has no partner in the universe)."""
        p = self.shape_pairs.get(shape)
        return p if p in self.shapes else None

    def sample_partner(self, scene: Scene, rng: random.Random) -> str | None:
        """A co-occurring shape absent from ``scene`` whose trigger is present (None if there is none)."""
        present = scene.shapes
        options = sorted({p for s in present if (p := self.partner(s)) is not None and p not in present})
        return rng.choice(options) if options else None

    def cooccurrence(self, scene: Scene, shape: str) -> float:
        """How strongly ``shape`` is suggested by the objects of ``scene``."""
        score = sum(self.pair_strength for s in scene.shapes if self.shape_pairs.get(s) == shape)
        score += sum(self.color_strength for o in scene.objects if self.color_pairs.get(o.color) == shape)
        return score

    def absent(self, scene: Scene) -> list[str]:
        return [s for s in self.shapes if s not in scene.shapes]

    def rank_adversarial(self, scene: Scene, rng: random.Random) -> list[str]:
        """Absent shapes, most co-occurring with the present ones first (ties in random order)."""
        absent = self.absent(scene)
        keys = {s: rng.random() for s in absent}
        return sorted(absent, key=lambda s: (-self.cooccurrence(scene, s), keys[s]))

    def frequencies(self, scenes: Iterable[Scene]) -> dict[str, int]:
        """How many scenes contain each shape of the universe."""
        counts: Counter[str] = Counter()
        for sc in scenes:
            counts.update(sc.shapes)
        return {s: counts[s] for s in self.shapes}

    def rank_popular(self, scene: Scene, frequencies: dict[str, int], rng: random.Random) -> list[str]:
        """Absent shapes, globally most frequent first (ties in random order)."""
        absent = self.absent(scene)
        keys = {s: rng.random() for s in absent}
        return sorted(absent, key=lambda s: (-frequencies.get(s, 0), keys[s]))

    def rank_random(self, scene: Scene, rng: random.Random) -> list[str]:
        absent: Sequence[str] = self.absent(scene)
        return rng.sample(list(absent), len(absent))
