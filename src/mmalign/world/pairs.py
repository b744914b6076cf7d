"""Preference data from the oracle: corrected-vs-original pairs, best-vs-worst of K, rankings.

Pure functions (no models): given a scene, the prompt and one or more responses, the oracle judges the
responses and the builders return schema records (``PreferencePair``, ``Ranking``) carrying every kind of
fine-grained feedback the alignment papers use — changed spans, per-aspect scores, critiques, facts and a
reward margin.

- :func:`corrected_pair` (RLHF-V): rejected = a response with errors, chosen = the oracle's minimal
  correction of it, so the two differ exactly on the hallucinated segments.
- :func:`ranked_pair`: the best and the worst of K responses by ``Oracle.rank``.
- :func:`ranking_record`: all K responses, best first, with per-response aspect scores.
- :func:`inject_midcaption_errors`: a caption whose errors sit in the *middle* (WORLD.md lesson 3: pairs
  that only differ at the tail make every DPO variant look alike), for building pairs without a model.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from mmalign.data.schema import ImageRef, Message, PreferencePair, Ranking
from mmalign.errors import DataError
from mmalign.world.grammar import DETAILED_CAPTION_PROMPT, caption_sentences, object_sentence
from mmalign.world.oracle import Oracle
from mmalign.world.scene import SHAPES_ALL, SIZES, Scene, SceneObject, WorldConfig

INJECTION_KINDS = ("object", "color")
"""Error kinds of :func:`inject_midcaption_errors`: a false object sentence, a wrong colour word."""


def task_of(prompt_messages: Sequence[Message]) -> str:
    """The oracle task a prompt asks for: ``detailed`` for the detailed-caption prompt, else ``caption``."""
    users = [m for m in prompt_messages if m.role == "user"]
    return "detailed" if users and users[-1].text.strip() == DETAILED_CAPTION_PROMPT else "caption"


def _common(
    scene: Scene,
    prompt_messages: Sequence[Message],
    image_ref: ImageRef | None,
    task: str | None,
    meta: dict[str, Any] | None,
) -> tuple[str, dict[str, Any]]:
    """Shared record fields: the task and the keyword arguments every record gets."""
    task = task or task_of(prompt_messages)
    fields: dict[str, Any] = {
        "prompt": list(prompt_messages),
        "images": [] if image_ref is None else [image_ref],
        "meta": {"scene": scene.to_dict(), "task": task, **(meta or {})},
    }
    return task, fields


def corrected_pair(
    scene: Scene,
    prompt_messages: Sequence[Message],
    response: str,
    *,
    id: str,
    image_ref: ImageRef | None = None,
    oracle: Oracle | None = None,
    task: str | None = None,
    meta: dict[str, Any] | None = None,
) -> PreferencePair | None:
    """RLHF-V-style pair: ``rejected`` = ``response``, ``chosen`` = the oracle's minimal correction.

    ``rejected_spans`` are the deleted sentences and rewritten words of the response, ``chosen_spans`` the
    rewritten words in the correction (deletions leave none). ``task`` defaults to :func:`task_of`.
    Returns None when the oracle changes nothing (the response is correct) or deletes everything (the
    correction is empty, which a pair cannot hold).
    """
    oracle = oracle or Oracle()
    task, fields = _common(scene, prompt_messages, image_ref, task, meta)
    fix = oracle.correct(scene, response)
    if fix.text == response or not fix.text.strip():
        return None
    return PreferencePair(
        id=id,
        chosen=fix.text,
        rejected=response,
        chosen_spans=list(fix.corrected_spans),
        rejected_spans=list(fix.original_spans),
        scores={
            "chosen": oracle.aspect_scores(scene, fix.text, task),
            "rejected": oracle.aspect_scores(scene, response, task),
        },
        critique={"chosen": oracle.critique(scene, fix.text), "rejected": oracle.critique(scene, response)},
        facts=oracle.facts(scene),
        margin=oracle.reward(scene, fix.text, task) - oracle.reward(scene, response, task),
        source="oracle-corrected",
        **fields,
    )


def _ranked(
    oracle: Oracle, scene: Scene, responses: Sequence[str], task: str
) -> tuple[list[int], list[dict[str, float]]]:
    """Oracle order (best first) of the non-empty responses, as indices into ``responses``, and the
    per-response aspect scores plus ``reward`` (aligned with ``responses``; ``{}`` for empty ones)."""
    keep = [i for i, r in enumerate(responses) if r.strip()]
    order, scores = oracle.rank(scene, [responses[i] for i in keep], task)
    by_index = {keep[j]: s for j, s in enumerate(scores)}
    return [keep[j] for j in order], [by_index.get(i, {}) for i in range(len(responses))]


def ranked_pair(
    scene: Scene,
    prompt_messages: Sequence[Message],
    responses: Sequence[str],
    *,
    id: str,
    image_ref: ImageRef | None = None,
    oracle: Oracle | None = None,
    task: str | None = None,
    meta: dict[str, Any] | None = None,
) -> PreferencePair | None:
    """Best vs worst of K responses by ``Oracle.rank`` (empty responses are ignored).

    ``margin`` = reward(chosen) − reward(rejected) (negative only when annotator noise swapped the two);
    ``meta`` records ``chosen_index``/``rejected_index`` into ``responses`` and ``k``. Returns None when
    fewer than two non-empty responses remain or all of them have the same reward (a tie).
    """
    oracle = oracle or Oracle()
    task, fields = _common(scene, prompt_messages, image_ref, task, meta)
    order, scores = _ranked(oracle, scene, responses, task)
    rewards = [scores[i]["reward"] for i in order]
    if len(order) < 2 or max(rewards) - min(rewards) < 1e-9:
        return None
    best, worst = order[0], order[-1]
    fields["meta"].update(k=len(responses), chosen_index=best, rejected_index=worst)
    chosen, rejected = responses[best], responses[worst]
    return PreferencePair(
        id=id,
        chosen=chosen,
        rejected=rejected,
        scores={"chosen": _aspects(scores[best]), "rejected": _aspects(scores[worst])},
        critique={"chosen": oracle.critique(scene, chosen), "rejected": oracle.critique(scene, rejected)},
        facts=oracle.facts(scene),
        margin=scores[best]["reward"] - scores[worst]["reward"],
        source="oracle-ranked",
        **fields,
    )


def _aspects(scores: dict[str, float]) -> dict[str, float]:
    return {a: v for a, v in scores.items() if a != "reward"}


def ranking_record(
    scene: Scene,
    prompt_messages: Sequence[Message],
    responses: Sequence[str],
    *,
    id: str,
    image_ref: ImageRef | None = None,
    oracle: Oracle | None = None,
    task: str | None = None,
    meta: dict[str, Any] | None = None,
) -> Ranking:
    """The non-empty responses **best first** with their aspect scores (and ``reward``) per response.

    ``meta["order"]`` holds the index of each listed response in ``responses``. Raises ``DataError``
    when fewer than two non-empty responses are given.
    """
    oracle = oracle or Oracle()
    task, fields = _common(scene, prompt_messages, image_ref, task, meta)
    order, scores = _ranked(oracle, scene, responses, task)
    if len(order) < 2:
        raise DataError(f"a ranking needs 2 non-empty responses, got {len(order)}", field="responses")
    fields["meta"]["order"] = order
    return Ranking(
        id=id, responses=[responses[i] for i in order], scores=[scores[i] for i in order], **fields
    )


def inject_midcaption_errors(
    scene: Scene,
    rng: random.Random,
    *,
    kinds: Sequence[str] = INJECTION_KINDS,
    config: WorldConfig | None = None,
    detailed: bool = False,
) -> str:
    """The caption of ``scene`` with errors that are always followed by a true, unchanged sentence.

    - ``object``: a sentence about a shape absent from the scene (random colour, size and a free cell if
      any), inserted between two true object sentences (before the only one if the scene has one object);
    - ``color``: one true object that is not the last one (a middle one when there are ≥ 3) gets a
      wrong colour; needs ≥ 2 objects.

    Kinds that cannot be placed (no absent shape; one object for ``color``) are skipped, so a caption
    without any error can come back. The last object sentence is always true, so the oracle's correction
    (delete the false sentence, rewrite the colour word) restores exactly ``caption(scene, detailed)``.
    """
    unknown = [k for k in kinds if k not in INJECTION_KINDS]
    if unknown:
        raise DataError(f"unknown error kinds {unknown}; expected some of {INJECTION_KINDS}", field="kinds")
    if not scene.objects:
        raise DataError("a scene without objects has no middle to put errors in", field="scene.objects")
    cfg = config or WorldConfig(grid=scene.grid)
    objects: list[SceneObject] = list(scene.objects)
    n = len(objects)
    if "color" in kinds and n >= 2:
        k = rng.randrange(1, n - 1) if n >= 3 else 0
        wrong = rng.choice([c for c in cfg.colors if c != objects[k].color])
        objects[k] = replace(objects[k], color=wrong)
    sentences = [object_sentence(o) for o in objects]
    absent = [s for s in cfg.shapes if s not in scene.shapes] or [
        s for s in SHAPES_ALL if s not in scene.shapes
    ]
    if "object" in kinds and absent:
        free = [c for c in cfg.cells if c not in {o.cell for o in scene.objects}] or list(cfg.cells)
        fake = SceneObject(rng.choice(absent), rng.choice(cfg.colors), rng.choice(SIZES), rng.choice(free))
        sentences.insert(rng.randrange(1, n) if n >= 2 else 0, object_sentence(fake))
    return " ".join(sentences + caption_sentences(scene, detailed=detailed)[n:])


VARIANT_KINDS = ("true", "object", "color", "omit", "repeat", "object+color")
"""Caption variants of :func:`caption_variants` by default: the true caption, one invented object, one wrong
colour, one object sentence left out, one sentence said twice, and an invented object plus a wrong colour."""
MORE_VARIANT_KINDS = ("omit2", "garbled", "garbled2", "no_background")
"""Opt-in variants that spread the aspects the default ones leave nearly constant: ``omit2`` leaves out
two object sentences (coverage ½ of the objects or less; needs ≥ 3 objects), ``garbled`` drops the shape
word of one object sentence, so that sentence is no longer well-formed (instruction following),
``garbled2`` does that to two object sentences (needs ≥ 2 objects), and ``no_background`` — for a
*detailed* caption only — leaves out the background sentence the detailed prompt asks for (the oracle takes
1 off instruction following, and coverage counts the background)."""
ALL_VARIANT_KINDS = VARIANT_KINDS + MORE_VARIANT_KINDS


def caption_variants(
    scene: Scene,
    rng: random.Random,
    *,
    kinds: Sequence[str] = VARIANT_KINDS,
    config: WorldConfig | None = None,
    detailed: bool = False,
) -> dict[str, str]:
    """Model-free responses of known quality for reward-model data, ``{kind: caption}``.

    With ``detailed`` every variant starts from the detailed caption (object sentences, then background and
    word, ``caption_sentences(scene, detailed=True)``) — the responses to the detailed-caption prompt; object
    edits touch object sentences only. Kinds that cannot be realised for this scene (no absent shape, a
    single object for ``color`` or ``omit``, fewer than three objects for ``omit2``, none for ``garbled``,
    fewer than two for ``garbled2``, a brief caption for ``no_background``) are left out, as are variants
    that coincide with another one. Each kind draws from ``rng`` in the order of ``kinds``, so adding a kind
    at the end never changes the variants before it.
    """
    unknown = [k for k in kinds if k not in ALL_VARIANT_KINDS]
    if unknown:
        raise DataError(
            f"unknown variant kinds {unknown}; expected some of {ALL_VARIANT_KINDS}", field="kinds"
        )
    sentences = caption_sentences(scene, detailed=detailed)
    true = " ".join(sentences)
    n = len(scene.objects)  # sentences[:n] are the object sentences, in object order
    out: dict[str, str] = {}
    for kind in kinds:
        if kind == "true":
            text = true
        elif kind == "omit":
            if n < 2:
                continue
            k = rng.randrange(n)
            text = " ".join(s for i, s in enumerate(sentences) if i != k)
        elif kind == "repeat":
            k = rng.randrange(len(sentences))
            text = " ".join([*sentences[: k + 1], sentences[k], *sentences[k + 1 :]])
        elif kind == "omit2":
            if n < 3:
                continue
            left_out = set(rng.sample(range(n), 2))
            text = " ".join(s for i, s in enumerate(sentences) if i not in left_out)
        elif kind in ("garbled", "garbled2"):
            n_broken = 1 if kind == "garbled" else 2
            if n < n_broken:
                continue
            broken = set(rng.sample(range(n), n_broken)) if n_broken > 1 else {rng.randrange(n)}
            text = " ".join(
                _without_shape(s, scene.objects[i].shape) if i in broken else s
                for i, s in enumerate(sentences)
            )
        elif kind == "no_background":
            if not detailed:
                continue
            text = " ".join(sentences[:n] + sentences[n + 1 :])  # background follows the objects
        else:
            errors = tuple(kind.split("+"))
            if ("color" in errors and n < 2) or not scene.objects:
                continue
            text = inject_midcaption_errors(scene, rng, kinds=errors, config=config, detailed=detailed)
        if text.strip() and text not in out.values():
            out[kind] = text
    return out


def _without_shape(sentence: str, shape: str) -> str:
    """An object sentence without its shape word: no longer well-formed for the world grammar."""
    return sentence.replace(f" {shape} ", " ", 1)


def oracle_pair(
    scene: Scene,
    prompt_messages: Sequence[Message],
    a: str,
    b: str,
    *,
    id: str,
    image_ref: ImageRef | None = None,
    oracle: Oracle | None = None,
    task: str | None = None,
    meta: dict[str, Any] | None = None,
) -> PreferencePair | None:
    """A pair of two given responses labelled by ``Oracle.prefer`` (with its annotator ``noise``), with
    per-side aspect scores, critiques, facts and ``margin`` = reward(chosen) − reward(rejected) (negative
    when noise flipped the label). None when the two responses have the same reward (a tie)."""
    oracle = oracle or Oracle()
    task, fields = _common(scene, prompt_messages, image_ref, task, meta)
    aspects = {a: oracle.aspect_scores(scene, a, task), b: oracle.aspect_scores(scene, b, task)}
    reward = {text: oracle.weighted(scores) for text, scores in aspects.items()}
    if abs(reward[a] - reward[b]) < 1e-9:
        return None
    chosen, rejected = (a, b) if oracle.prefer(scene, a, b, task) == 0 else (b, a)
    return PreferencePair(
        id=id,
        chosen=chosen,
        rejected=rejected,
        scores={"chosen": aspects[chosen], "rejected": aspects[rejected]},
        critique={"chosen": oracle.critique(scene, chosen), "rejected": oracle.critique(scene, rejected)},
        facts=oracle.facts(scene),
        margin=reward[chosen] - reward[rejected],
        source="oracle-variants",
        **fields,
    )
