"""The caption grammar of the shapes world (generator side; ``parse.py`` is the matching parser).

One sentence per object — ``There is a large red circle in the top left.`` — in the scene's object
order; a detailed caption adds the background sentence and, when a word is shown, the text sentence.
See docs/CONTRACTS.md for the exact grammar both sides agree on.
"""

from __future__ import annotations

from mmalign.data.answers import NUMBER_WORDS
from mmalign.world.scene import Scene, SceneObject

CAPTION_PROMPT = "Describe the image."
DETAILED_CAPTION_PROMPT = "Describe the image in detail."


def article(word: str) -> str:
    """``an`` before a vowel-initial word, else ``a``."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def number_word(n: int) -> str:
    """``2 -> "two"`` for 0..12, digits beyond."""
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def plural(shape: str) -> str:
    """Plural of a shape noun (``cross -> crosses``)."""
    return shape + "es" if shape.endswith(("s", "x", "sh", "ch")) else shape + "s"


def noun_phrase(shape: str, color: str | None = None, size: str | None = None) -> str:
    """``a large red circle`` / ``an orange star`` / ``a star`` (article agrees with the first word)."""
    words = [w for w in (size, color, shape) if w]
    return f"{article(words[0])} {' '.join(words)}"


def object_sentence(obj: SceneObject) -> str:
    """``There is a large red circle in the top left.``"""
    return f"There is {noun_phrase(obj.shape, obj.color, obj.size)} in the {obj.cell}."


def background_sentence(background: str) -> str:
    return f"The background is {background}."


def text_sentence(word: str) -> str:
    return f"The word {word} is written."


def caption_sentences(scene: Scene, detailed: bool = False) -> list[str]:
    """The sentences of :func:`caption`, in order."""
    sentences = [object_sentence(o) for o in scene.objects]
    if detailed:
        sentences.append(background_sentence(scene.background))
        if scene.text:
            sentences.append(text_sentence(scene.text))
    return sentences


def caption(scene: Scene, detailed: bool = False) -> str:
    """Brief caption (object sentences joined by one space) or detailed (+ background, + word)."""
    return " ".join(caption_sentences(scene, detailed))
