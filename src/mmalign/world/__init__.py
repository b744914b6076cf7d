"""mmalign.world — the shapes world: a verifiable world for alignment on a CPU.

Modules: ``scene`` (scenes), ``grammar`` (captions), ``render`` (Pillow images), ``prior``
(co-occurrence prior), ``questions`` (QA, deceptive, POPE, dialogues and their judge), ``textworld``
(FOL and arithmetic), ``tokenizer`` (WordLevel tokenizer + chat template), ``corpus`` (SFT corpus with
injected hallucinations, eval scenes, ``make_world``), ``parse`` / ``oracle`` (the annotator).
Only the light core is re-exported here; import the other modules directly.
"""

from __future__ import annotations

from mmalign.world.grammar import caption, object_sentence
from mmalign.world.scene import Scene, SceneObject, WorldConfig, make_scene

__all__ = ["Scene", "SceneObject", "WorldConfig", "caption", "make_scene", "object_sentence"]
