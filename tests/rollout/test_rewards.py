"""The Reward protocol: oracle, exact-answer and model rewards plug in behind one ``score(batch)`` call;
model rewards build the RM input of their kind (facts appended, critique generated first)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mmalign.data.rm_inputs import FACTS_HEADER
from mmalign.data.schema import Message
from mmalign.errors import DataError
from mmalign.models.heads import RewardModel
from mmalign.rollout import rewards as R
from mmalign.world.oracle import ASPECTS, Oracle
from mmalign.world.render import render
from mmalign.world.scene import Scene, SceneObject

SCENE = Scene(
    objects=(
        SceneObject("circle", "red", "large", "top left"),
        SceneObject("square", "blue", "small", "top right"),
    ),
    background="white",
)
PROMPT = [Message.user("Describe the image.", n_images=1)]


def batch(responses: list[str], **truth: Any) -> R.RewardBatch:
    image = render(SCENE, 64)
    return R.RewardBatch(
        prompts=[PROMPT] * len(responses),
        responses=responses,
        images=[[image]] * len(responses),
        truths=[{"scene": SCENE.to_dict(), "facts": Oracle().facts(SCENE), **truth}] * len(responses),
    )


def test_oracle_reward_equals_the_oracles_weighted_aspect_score() -> None:
    good = "There is a large red circle in the top left. There is a small blue square in the top right."
    bad = "There is a large red circle in the top left. There is a green star."
    out = R.OracleReward().score(batch([good, bad]))
    oracle = Oracle()
    assert out.scores.tolist() == pytest.approx([oracle.reward(SCENE, good), oracle.reward(SCENE, bad)])
    assert out.scores[0] > out.scores[1]
    assert set(out.aspects) == set(ASPECTS)
    assert out.aspects["correctness"][1] == oracle.aspect_scores(SCENE, bad)["correctness"]


def test_exact_answer_reward_compares_final_answers() -> None:
    b = R.RewardBatch(
        prompts=[PROMPT] * 4,
        responses=["3 + 4 = 7. The answer is 7.", "The answer is 8", "Yes, there is.", "1,200 apples"],
        truths=[{"answer": "7"}, {"answer": "7"}, {"answer": "yes"}, {"answer": "1200"}],
    )
    assert R.ExactAnswerReward().score(b).scores.tolist() == [1.0, 0.0, 1.0, 1.0]
    assert R.final_answer("I cannot tell") is None and R.final_answer("It is 2.50 now") == "2.5"
    # the number after the answer marker, not a later check; GSM8K's "####"
    assert R.final_answer("The answer is 72. Check: 3 + 4 = 7.") == "72"
    assert R.final_answer("so 9 * 8 = 72\n#### 72") == "72"


def test_missing_truth_and_length_mismatch_name_the_field() -> None:
    with pytest.raises(DataError, match=r"truths.0.scene"):
        R.OracleReward().score(R.RewardBatch(prompts=[PROMPT], responses=["x"]))
    with pytest.raises(DataError, match="responses: 1 entries for 2 prompts"):
        R.RewardBatch(prompts=[PROMPT, PROMPT], responses=["x"])


@pytest.fixture(scope="module")
def tiny_llava() -> tuple[Any, Any]:
    from mmalign.models.tiny import build_tiny

    torch.manual_seed(0)
    return build_tiny("llava", image_size=32, patch_size=8, text_hidden=64, text_layers=2, vision_hidden=32)


@pytest.mark.parametrize("kind", ["bt", "fact", "fact:user", "aspects"])
def test_model_reward_scores_the_rm_input_of_its_kind(kind: str, tiny_llava: tuple[Any, Any]) -> None:
    backbone, proc = tiny_llava
    kind, _, placement = kind.partition(":")
    placement = placement or "system"
    dim = 2 if kind == "aspects" else 1
    rm = RewardModel(
        backbone,
        dim=dim,
        aspects=("correctness", "coverage") if dim == 2 else None,
        kind=kind,
        facts_placement=placement,
    )
    reward = R.ModelReward(rm, proc, weights={"correctness": 3.0, "coverage": 1.0} if dim == 2 else None)
    assert isinstance(reward, R.Reward)
    texts = ["There is a red circle.", "There is a green star.", ""]
    b = batch(texts)
    out = reward.score(b)
    assert out.scores.shape == (3,)
    # the same numbers from a direct forward over the conversation of this kind
    for i, text in enumerate(texts):
        messages = R.rm_conversation(
            kind,
            PROMPT,
            text or R.EMPTY_RESPONSE,
            b.truths[i],
            facts_placement=placement,  # type: ignore[arg-type]
        )
        rendered = proc.apply_chat_template([m.model_dump() for m in messages], tokenize=False)
        assert (FACTS_HEADER in rendered) is (kind == "fact")
        if kind == "fact":  # system turn first, or the facts at the end of the user turn
            assert rendered.startswith("<|system|>") is (placement == "system")
        enc = proc(images=b.images[i], text=[rendered], return_tensors="pt")
        with torch.no_grad():
            raw = rm(enc.pop("input_ids"), enc.pop("attention_mask"), **enc)[0]
        want = (raw[0] * 3 + raw[1]) / 4 if dim == 2 else raw[0]
        assert float(out.scores[i]) == pytest.approx(float(want), abs=1e-5)
    if dim == 2:
        assert set(out.aspects) == {"correctness", "coverage"}


def test_critique_reward_generates_a_critique_then_scores_with_it(tiny_llava: tuple[Any, Any]) -> None:
    backbone, proc = tiny_llava
    rm = RewardModel(backbone, kind="critique")
    reward = R.ModelReward(rm, proc, critique_max_new_tokens=5)
    b = batch(["There is a red circle."])
    out = reward.score(b)
    critique = out.info[0]["critique"]
    assert isinstance(critique, str)
    direct = reward.raw(b, [critique])[0, 0]
    assert float(out.scores[0]) == pytest.approx(float(direct), abs=1e-6)
