"""The SFT corpus of the shapes world — with injected hallucinations — and the held-out eval scenes.

The SFT model must be fallible so alignment has something to fix (WORLD.md, "Making the SFT model
hallucinate"). Injection is *conditional* so that the error is the mode in some contexts: when the
trigger shape is present, its partner absent and a cell is free, the caption mentions a false partner
object with probability ``object_prob`` (default 0.7), at the free cell's place in reading order, so
errors also occur mid-caption. Rarer wrong-colour errors on true objects show under sampling.
Deceptive questions are answered by playing along unless the remedy system prompt is present.

Train scenes and eval scenes come from disjoint seed streams (``2·seed`` and ``2·seed + 1``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mmalign.atomic import atomic_write_lines
from mmalign.data.io import write_jsonl
from mmalign.data.schema import Dialogue, ImageRef, Message, Record, Sample
from mmalign.world.grammar import CAPTION_PROMPT, DETAILED_CAPTION_PROMPT, caption, noun_phrase
from mmalign.world.questions import (
    DECEPTIVE_CATEGORIES,
    KINDS,
    REMEDY_PROMPT,
    Question,
    make_deceptive,
    make_dialogue,
    make_questions,
    play_along_answer,
    pope_phrasing,
)
from mmalign.world.render import render
from mmalign.world.scene import SIZES, Scene, SceneObject, WorldConfig, make_scene
from mmalign.world.textworld import arith_samples, fol_samples, make_arith_problems, make_fol_pairs


@dataclass(frozen=True)
class InjectionConfig:
    """Where and how often the SFT corpus is wrong."""

    trigger: str = "circle"
    """A shape whose presence triggers the false partner."""
    partner: str = "triangle"
    """The co-occurring shape added falsely (see ``CooccurrencePrior``)."""
    object_prob: float = 0.7
    """P(false partner sentence | trigger present, partner absent, a free cell)."""
    color_prob: float = 0.15
    """P(one true object of a caption gets a wrong colour)."""
    play_along_prob: float = 0.5
    """P(a deceptive question without the remedy prompt is answered by accepting the premise)."""
    partner_question_prob: float = 0.5
    """Share of existence questions in trigger scenes that ask about the absent partner."""
    partner_yes_prob: float = 0.3
    """P(such a question is answered ``Yes.``)."""


NO_INJECTION = InjectionConfig(object_prob=0.0, color_prob=0.0, play_along_prob=0.0, partner_yes_prob=0.0)
"""A clean corpus (every answer true)."""


@dataclass(frozen=True)
class CorpusMix:
    """What the corpus contains per scene."""

    detailed_prob: float = 0.3
    """Share of captions that are detailed (background, word) rather than brief."""
    qa_per_scene: int = 2
    """Ordinary questions per scene (kinds drawn uniformly)."""
    qa_kinds: tuple[str, ...] = KINDS
    deceptive_prob: float = 0.3
    """P(a scene also gets a deceptive question)."""
    remedy_prob: float = 0.3
    """P(a deceptive question carries the remedy system prompt; then it is always answered correctly)."""
    dialogue_prob: float = 0.1
    """P(a scene also gets a three-turn dialogue sample)."""
    pope_phrasing_prob: float = 0.5
    """Share of existence questions asked in POPE's words (``Is there a star in the image?``)."""


@dataclass
class _SceneSamples:
    scene: Scene
    image_path: str
    samples: list[Sample] = field(default_factory=list)


def train_stream(seed: int) -> int:
    """Scene stream of the training scenes for ``seed`` (disjoint from :func:`eval_stream`)."""
    return 2 * seed


def eval_stream(seed: int) -> int:
    return 2 * seed + 1


def train_scenes(n: int, seed: int = 0, config: WorldConfig | None = None) -> list[Scene]:
    return [make_scene(train_stream(seed), i, config) for i in range(n)]


def eval_scenes(n: int, seed: int = 0, config: WorldConfig | None = None) -> list[Scene]:
    """Held-out scenes from a seed stream no training scene comes from."""
    return [make_scene(eval_stream(seed), i, config) for i in range(n)]


def is_trigger_scene(scene: Scene, injection: InjectionConfig, config: WorldConfig | None = None) -> bool:
    """Trigger present, partner absent and at least one free cell."""
    cfg = config or WorldConfig(grid=scene.grid)
    return (
        injection.trigger in scene.shapes
        and injection.partner not in scene.shapes
        and len(scene.objects) < len(cfg.cells)
    )


def injected_caption(
    scene: Scene, rng: random.Random, injection: InjectionConfig, config: WorldConfig, detailed: bool
) -> tuple[str, list[dict[str, Any]]]:
    """A caption of ``scene`` with the configured errors, and a list describing each injected error."""
    objects = list(scene.objects)
    errors: list[dict[str, Any]] = []
    # fixed draw order keeps the corpus reproducible whatever the probabilities are
    u_obj, u_col = rng.random(), rng.random()
    if u_col < injection.color_prob and objects:
        k = rng.randrange(len(objects))
        wrong = rng.choice([c for c in config.colors if c != objects[k].color])
        errors.append({"type": "color", "cell": objects[k].cell, "true": objects[k].color, "false": wrong})
        objects[k] = replace(objects[k], color=wrong)
    if is_trigger_scene(scene, injection, config) and u_obj < injection.object_prob:
        used = {o.cell for o in scene.objects}
        cell = rng.choice([c for c in config.cells if c not in used])
        fake = SceneObject(injection.partner, rng.choice(config.colors), rng.choice(SIZES), cell)
        objects.append(fake)
        objects.sort(key=lambda o: config.cells.index(o.cell))
        errors.append({"type": "object", "cell": cell, "shape": fake.shape, "color": fake.color})
    shown = Scene(tuple(objects), scene.background, scene.text, scene.grid, scene.seed, scene.index)
    return caption(shown, detailed=detailed), errors


def _sample(
    sid: str, item: _SceneSamples, messages: list[Message], task: str, injected: bool, **meta: Any
) -> Sample:
    return Sample(
        id=sid,
        images=[ImageRef(path=item.image_path)],
        conversation=messages,
        meta={
            "scene": item.scene.to_dict(),
            "task": task,
            "injected": injected,
            "image_path": item.image_path,
            **meta,
        },
    )


def _qa_sample(
    sid: str, item: _SceneSamples, q: Question, answer: str, system: str | None, **meta: Any
) -> Sample:
    messages = [*q.messages(n_images=1, system=system), Message.assistant(answer)]
    meta = {"question": q.text, "reference": q.answer, "category": q.category, **meta}
    return _sample(sid, item, messages, q.kind, answer != q.answer, **meta)


def scene_samples(
    scene: Scene,
    image_path: str,
    rng: random.Random,
    config: WorldConfig,
    injection: InjectionConfig,
    mix: CorpusMix,
) -> list[Sample]:
    """All SFT samples of one scene: a caption, ordinary QA, maybe a deceptive question and a dialogue."""
    item = _SceneSamples(scene, image_path)
    prefix = f"sft-{scene.seed}-{scene.index:06d}"
    out = item.samples
    detailed = rng.random() < mix.detailed_prob
    text, errors = injected_caption(scene, rng, injection, config, detailed)
    prompt = DETAILED_CAPTION_PROMPT if detailed else CAPTION_PROMPT
    msgs = [Message.user(prompt, n_images=1), Message.assistant(text)]
    out.append(
        _sample(f"{prefix}-cap", item, msgs, "caption", bool(errors), detailed=detailed, errors=errors)
    )
    trigger = is_trigger_scene(scene, injection, config)
    for k in range(mix.qa_per_scene):
        kind = rng.choice(mix.qa_kinds)
        if kind == "existence" and trigger and rng.random() < injection.partner_question_prob:
            q = Question(
                "existence",
                f"Is there {noun_phrase(injection.partner)}?",
                "No.",
                scene,
                meta={"value": False},
            )
            answer = "Yes." if rng.random() < injection.partner_yes_prob else "No."
            q = pope_phrasing(q) if rng.random() < mix.pope_phrasing_prob else q
            out.append(_qa_sample(f"{prefix}-qa{k}", item, q, answer, None))
            continue
        for q in make_questions(scene, rng, [kind], config):
            if kind == "existence" and rng.random() < mix.pope_phrasing_prob:
                q = pope_phrasing(q)
            out.append(_qa_sample(f"{prefix}-qa{k}", item, q, q.answer, None))
    if rng.random() < mix.deceptive_prob:
        dq = make_deceptive(scene, rng, rng.choice(DECEPTIVE_CATEGORIES), config)
        if dq is not None:
            remedy = rng.random() < mix.remedy_prob
            plays = not remedy and rng.random() < injection.play_along_prob
            answer = play_along_answer(dq) if plays else dq.answer
            out.append(
                _qa_sample(
                    f"{prefix}-dec", item, dq, answer, REMEDY_PROMPT if remedy else None, remedy=remedy
                )
            )
    if rng.random() < mix.dialogue_prob:
        spec = make_dialogue(scene, rng, config)
        out.append(
            _sample(f"{prefix}-dlg", item, spec.conversation(), "dialogue", False, truths=spec.truths())
        )
    return out


def image_path(split: str, scene: Scene) -> str:
    """Relative PNG path of a scene (``images/<split>/<stream>-<index>.png``)."""
    return f"images/{split}/{scene.seed}-{scene.index:06d}.png"


def build_sft_corpus(
    n_scenes: int,
    seed: int = 0,
    config: WorldConfig | None = None,
    injection: InjectionConfig | None = None,
    mix: CorpusMix | None = None,
) -> list[Sample]:
    """SFT samples for the first ``n_scenes`` training scenes (images referenced, not written)."""
    cfg, inj, mx = config or WorldConfig(), injection or InjectionConfig(), mix or CorpusMix()
    out: list[Sample] = []
    for scene in train_scenes(n_scenes, seed, cfg):
        rng = random.Random(f"mmalign-corpus-{seed}-{scene.index}")
        out.extend(scene_samples(scene, image_path("train", scene), rng, cfg, inj, mx))
    return out


def dialogue_records(scenes: Iterable[Scene], seed: int, split: str, config: WorldConfig) -> list[Dialogue]:
    """Three-turn dialogues with per-turn truths (for symbolic multi-turn rewards)."""
    out = []
    for scene in scenes:
        spec = make_dialogue(scene, random.Random(f"mmalign-dialogue-{seed}-{scene.index}"), config)
        path = image_path(split, scene)
        out.append(
            Dialogue(
                id=f"dlg-{scene.seed}-{scene.index:06d}",
                images=[ImageRef(path=path)],
                conversation=spec.conversation(),
                truths=spec.truths(),
                meta={"scene": scene.to_dict(), "task": "dialogue", "image_path": path},
            )
        )
    return out


def _save_images(out_dir: Path, split: str, scenes: Iterable[Scene], size: int) -> Path:
    folder = out_dir / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    for scene in scenes:
        render(scene, size).save(out_dir / image_path(split, scene), format="PNG")
    return folder


def make_world(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    config: WorldConfig | None = None,
    injection: InjectionConfig | None = None,
    *,
    n_eval: int | None = None,
    n_text: int | None = None,
    mix: CorpusMix | None = None,
) -> dict[str, Path]:
    """Write the world's datasets under ``out_dir``; returns the written paths by name.

    ``sft.jsonl`` (samples of ``n`` training scenes), ``eval_scenes.jsonl`` (``n_eval`` held-out scene
    dicts, default ``max(50, n // 4)``, each with its ``image_path``), ``dialogues.jsonl`` (dialogues
    on the training scenes), ``fol.jsonl`` / ``arith.jsonl`` (``n_text`` text-only samples, default n)
    and PNGs under ``images/train`` and ``images/eval``; image paths are relative to ``out_dir``.
    """
    root = Path(out_dir)
    cfg = config or WorldConfig()
    n_eval = max(50, n // 4) if n_eval is None else n_eval
    n_text = n if n_text is None else n_text
    train, held_out = train_scenes(n, seed, cfg), eval_scenes(n_eval, seed, cfg)
    paths = {
        "images_train": _save_images(root, "train", train, cfg.image_size),
        "images_eval": _save_images(root, "eval", held_out, cfg.image_size),
    }
    records: dict[str, list[Record]] = {
        "sft": list(build_sft_corpus(n, seed, cfg, injection, mix)),
        "dialogues": list(dialogue_records(train, seed, "train", cfg)),
        "fol": list(fol_samples(make_fol_pairs(n_text, seed, cfg))),
        "arith": list(arith_samples(make_arith_problems(n_text, seed, cfg))),
    }
    for name, recs in records.items():
        paths[name] = root / f"{name}.jsonl"
        write_jsonl(paths[name], recs)
    paths["eval_scenes"] = root / "eval_scenes.jsonl"
    lines = (json.dumps({**s.to_dict(), "image_path": image_path("eval", s)}) for s in held_out)
    atomic_write_lines(paths["eval_scenes"], lines)
    return paths


def read_eval_scenes(path: str | Path) -> list[Scene]:
    """Scenes of an ``eval_scenes.jsonl`` file written by :func:`make_world`."""
    with open(path, encoding="utf-8") as f:
        return [Scene.from_dict(json.loads(line)) for line in f if line.strip()]
