"""Preference pairs from a model's own samples, annotated by the oracle (the data step of DPO recipes).

``sample_pairs`` renders each scene, samples K captions per scene at a temperature and turns them into
pairs with the oracle: a corrected pair (RLHF-V) from every distinct sample with an error anywhere in
it, or one best-vs-worst pair per scene. Sampled responses put errors in the middle of captions too,
which is where segment-weighted losses differ from plain DPO (WORLD.md, lesson 3); ``pair_stats``
measures how many pairs have such mid-response errors.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import mmalign.rollout.generate as G
from mmalign.data.io import write_jsonl
from mmalign.data.schema import ImageRef, Message, PreferencePair
from mmalign.errors import DataError
from mmalign.world.grammar import CAPTION_PROMPT, DETAILED_CAPTION_PROMPT
from mmalign.world.oracle import Oracle
from mmalign.world.pairs import (
    INJECTION_KINDS,
    VARIANT_KINDS,
    caption_variants,
    corrected_pair,
    inject_midcaption_errors,
    oracle_pair,
    ranked_pair,
)
from mmalign.world.parse import parse_response
from mmalign.world.render import render
from mmalign.world.scene import Scene, WorldConfig

PairKind = Literal["corrected", "ranked"]
GenerateFn = Callable[..., list[str]]
"""Same call as ``mmalign.rollout.generate.generate`` (model, processor, prompts, images, **kwargs)."""


class _Images:
    """Image references of scenes: embedded PNGs, or PNG files ``<seed>-<index>.png`` in ``image_dir``
    (paths absolute, or relative to ``relative_to``), written only for scenes that get a pair."""

    def __init__(self, image_dir: str | Path | None, relative_to: str | Path | None) -> None:
        self.dir = None if image_dir is None else Path(image_dir).resolve()
        self.relative_to = relative_to
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, scene: Scene) -> Path:
        assert self.dir is not None
        return self.dir / f"{scene.seed}-{scene.index:06d}.png"

    def ref(self, scene: Scene, image: Any) -> ImageRef:
        if self.dir is None:
            return ImageRef.from_pil(image)
        path = self._path(scene)
        return ImageRef(
            path=os.path.relpath(path, self.relative_to) if self.relative_to is not None else str(path)
        )

    def save(self, scene: Scene, image: Any) -> None:
        if self.dir is not None:
            image.save(self._path(scene), format="PNG")


def sample_pairs(
    model: Any,
    processor: Any,
    scenes: Sequence[Scene],
    *,
    k: int = 4,
    temperature: float = 1.0,
    seed: int = 0,
    kind: PairKind = "corrected",
    image_dir: str | Path | None = None,
    relative_to: str | Path | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    detailed: bool = False,
    image_size: int | None = None,
    oracle: Oracle | None = None,
    generate_fn: GenerateFn | None = None,
) -> list[PreferencePair]:
    """Sample ``k`` captions per scene (``do_sample=True``) and build oracle pairs from them.

    - ``kind="corrected"``: one pair per distinct sample the oracle corrects (identical samples of a
      scene give one pair; correct, unparseable-only and empty samples give none);
    - ``kind="ranked"``: per scene, the best vs the worst sample (none when all samples tie).

    Images are embedded PNGs, or with ``image_dir`` PNG files ``<seed>-<index>.png`` there (only for scenes
    with pairs), referenced by absolute path or relative to ``relative_to`` (normally the folder of the
    JSONL file). Pair ids are
    ``<kind>-<seed>-<index>[-<sample>]``; ``meta`` holds the scene, task, sample index and temperature.
    ``generate_fn`` defaults to ``mmalign.rollout.generate.generate`` (looked up at call time).
    """
    if kind not in ("corrected", "ranked"):
        raise DataError(f"expected 'corrected' or 'ranked', got {kind!r}", field="kind")
    if k < (2 if kind == "ranked" else 1):
        raise DataError(f"need at least {2 if kind == 'ranked' else 1} samples per scene, got {k}", field="k")
    oracle = oracle or Oracle()
    generate = generate_fn or G.generate
    store = _Images(image_dir, relative_to)

    prompt = [Message.user(DETAILED_CAPTION_PROMPT if detailed else CAPTION_PROMPT, n_images=1)]
    images = [render(s, image_size) for s in scenes]
    # Scene-major order: prompts[i * k + j] is sample j of scene i.
    texts = generate(
        model,
        processor,
        [prompt for _ in scenes for _ in range(k)],
        [[im] for im in images for _ in range(k)],
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
    )
    if len(texts) != len(scenes) * k:
        raise DataError(f"generate returned {len(texts)} responses for {len(scenes) * k} prompts")

    meta = {"temperature": temperature}
    pairs: list[PreferencePair] = []
    for i, (scene, image) in enumerate(zip(scenes, images, strict=True)):
        samples = [t.strip() for t in texts[i * k : (i + 1) * k]]
        ref = store.ref(scene, image)
        name = f"{kind}-{scene.seed}-{scene.index:06d}"
        common: dict[str, Any] = {"image_ref": ref, "oracle": oracle}
        if kind == "ranked":
            built = [ranked_pair(scene, prompt, samples, id=name, meta=meta, **common)]
        else:  # distinct samples in order of first appearance
            built = [
                corrected_pair(scene, prompt, text, id=f"{name}-{j}", meta={"sample": j, **meta}, **common)
                for text in dict.fromkeys(samples)
                for j in [samples.index(text)]
            ]
        kept = [p for p in built if p is not None]
        if kept:
            store.save(scene, image)
        pairs.extend(kept)
    return pairs


def injected_pairs(
    scenes: Sequence[Scene],
    *,
    seed: int = 0,
    kinds: Sequence[str] = INJECTION_KINDS,
    config: WorldConfig | None = None,
    detailed: bool = False,
    image_dir: str | Path | None = None,
    relative_to: str | Path | None = None,
    oracle: Oracle | None = None,
) -> list[PreferencePair]:
    """Model-free corrected pairs with mid-caption errors: per scene, ``rejected`` =
    ``inject_midcaption_errors`` (rng seeded by ``seed`` and the scene), ``chosen`` = its correction (the
    true caption). Scenes where no error could be placed give no pair. Ids ``injected-<seed>-<index>``."""
    oracle, store = oracle or Oracle(), _Images(image_dir, relative_to)
    prompt = [Message.user(DETAILED_CAPTION_PROMPT if detailed else CAPTION_PROMPT, n_images=1)]
    pairs = []
    for scene in scenes:
        rng = random.Random(f"mmalign-injected-{seed}-{scene.seed}-{scene.index}")
        text = inject_midcaption_errors(scene, rng, kinds=kinds, config=config, detailed=detailed)
        image = render(scene, config.image_size if config else None)
        name = f"injected-{scene.seed}-{scene.index:06d}"
        pair = corrected_pair(scene, prompt, text, id=name, image_ref=store.ref(scene, image), oracle=oracle)
        if pair is not None:
            store.save(scene, image)
            pairs.append(pair.model_copy(update={"source": "oracle-injected"}))
    return pairs


def variant_pairs(
    scenes: Sequence[Scene],
    *,
    seed: int = 0,
    kinds: Sequence[str] = VARIANT_KINDS,
    oracle: Oracle | None = None,
    config: WorldConfig | None = None,
    image_dir: str | Path | None = None,
    relative_to: str | Path | None = None,
    detailed_share: float = 0.0,
) -> list[PreferencePair]:
    """Reward-model data without a model: per scene, the caption variants of ``caption_variants`` (true,
    invented object, wrong colour, omission, repetition, …) and every pair of them with different oracle
    rewards, labelled by ``oracle`` (give it ``noise`` for human-like label noise). Pairs of one scene share
    ``meta["group"]`` (Acc+ groups) and carry scores, critiques, facts and margins.

    ``detailed_share``: the share of scenes (drawn per scene from its own seeded stream, so the other
    scenes' variants do not change) asked with the detailed-caption prompt; their variants start from the
    detailed caption, and the oracle scores them as ``detailed`` (coverage counts background and word,
    instruction following drops when the background is missing — see ``Oracle.aspect_scores``)."""
    if not 0.0 <= detailed_share <= 1.0:
        raise DataError(f"detailed_share must be in [0, 1], got {detailed_share}", field="detailed_share")
    oracle, store = oracle or Oracle(), _Images(image_dir, relative_to)
    prompts = {
        False: [Message.user(CAPTION_PROMPT, n_images=1)],
        True: [Message.user(DETAILED_CAPTION_PROMPT, n_images=1)],
    }
    out: list[PreferencePair] = []
    for scene in scenes:
        rng = random.Random(f"mmalign-variants-{seed}-{scene.seed}-{scene.index}")
        task_rng = random.Random(f"mmalign-variants-task-{seed}-{scene.seed}-{scene.index}")
        detailed = detailed_share > 0 and task_rng.random() < detailed_share
        prompt = prompts[detailed]
        variants = list(caption_variants(scene, rng, kinds=kinds, config=config, detailed=detailed).items())
        image = render(scene, config.image_size if config else None)
        group = f"scene-{scene.seed}-{scene.index:06d}"
        made = 0
        for i in range(len(variants)):
            for j in range(i + 1, len(variants)):
                (ka, a), (kb, b) = variants[i], variants[j]
                pair = oracle_pair(
                    scene,
                    prompt,
                    a,
                    b,
                    id=f"{group}-{ka}-{kb}",
                    image_ref=store.ref(scene, image),
                    oracle=oracle,
                    meta={"group": group, "kinds": [ka, kb]},
                )
                if pair is not None:
                    out.append(pair)
                    made += 1
        if made:
            store.save(scene, image)
    return out


def write_pairs(path: str | Path, pairs: Sequence[PreferencePair]) -> None:
    """Write pairs as validated JSONL (atomically, see ``mmalign.data.io.write_jsonl``)."""
    write_jsonl(path, pairs)


def _changed_end(pair: PreferencePair) -> int:
    """Character offset in ``rejected`` where its last changed segment ends.

    From ``rejected_spans`` when given, else from the longest common suffix of the two responses."""
    if pair.rejected_spans:
        return max(end for _, end in pair.rejected_spans)
    a, b = pair.rejected, pair.chosen
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return len(a) - n


def has_midresponse_change(pair: PreferencePair) -> bool:
    """Whether a whole untouched sentence of ``rejected`` follows its last changed segment."""
    end = _changed_end(pair)
    return any(s.start >= end for s in parse_response(pair.rejected).sentences)


def pair_stats(pairs: Sequence[PreferencePair]) -> dict[str, Any]:
    """``n``, ``mean_margin`` (over pairs with a margin; None if none) and ``mid_share``: the share of
    pairs whose last change in ``rejected`` is followed by an untouched sentence (errors mid-response)."""
    margins = [p.margin for p in pairs if p.margin is not None]
    return {
        "n": len(pairs),
        "mean_margin": sum(margins) / len(margins) if margins else None,
        "mid_share": sum(map(has_midresponse_change, pairs)) / len(pairs) if pairs else 0.0,
    }
