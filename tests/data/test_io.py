"""JSONL reading/writing, image storage conversions and HF datasets round trips."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmalign.data.io import (
    embed_images,
    externalise_images,
    from_hf_dataset,
    iter_jsonl,
    read_jsonl,
    to_hf_dataset,
    write_jsonl,
)
from mmalign.data.schema import Dialogue, ImageRef, Message, PreferencePair, Ranking, Sample
from mmalign.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures"


def _sample_line(**overrides: object) -> dict[str, object]:
    line: dict[str, object] = {
        "kind": "sample",
        "id": "x",
        "conversation": [
            {"role": "user", "content": "Q?"},
            {"role": "assistant", "content": "A."},
        ],
    }
    line.update(overrides)
    return line


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _error_of(path: Path, kind: str | None = None) -> str:
    with pytest.raises(DataError) as info:
        read_jsonl(path, kind)
    return str(info.value)


def test_read_fixture_samples_validates_and_skips_blank_lines() -> None:
    records = read_jsonl(FIXTURES / "samples.jsonl")
    assert [r.id for r in records] == ["s1", "s2"]
    s1 = records[0]
    assert isinstance(s1, Sample)
    assert s1.images == [ImageRef(path="red.png")]
    assert s1.conversation[1].text == "There is a red square."
    assert s1.images[0].load(FIXTURES).getpixel((0, 0)) == (255, 0, 0)
    assert records[1].meta == {"split": "train"}


def test_iter_jsonl_streams_records_lazily(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "d.jsonl", [json.dumps(_sample_line(id="a")), "{broken"])
    it = iter_jsonl(path)
    assert next(it).id == "a"  # the first record arrives before the bad line is read
    with pytest.raises(DataError, match=r"d\.jsonl:2: malformed JSON"):
        next(it)


def test_malformed_json_names_file_line_and_column(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "d.jsonl", [json.dumps(_sample_line()), '{"kind": "sample", "id" 1}'])
    assert _error_of(path) == f"{path}:2: malformed JSON: Expecting ':' delimiter at column 25"


def test_unknown_role_names_the_dotted_field(tmp_path: Path) -> None:
    line = _sample_line(conversation=[{"role": "user", "content": "Q"}, {"role": "robot", "content": "A"}])
    path = _write_lines(tmp_path / "d.jsonl", [json.dumps(line)])
    msg = _error_of(path)
    assert msg.startswith(f"{path}:1: conversation.1.role: unknown role 'robot'")


def test_empty_response_names_the_assistant_turn(tmp_path: Path) -> None:
    line = _sample_line(
        conversation=[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "  "}]
    )
    path = _write_lines(tmp_path / "d.jsonl", ["", json.dumps(line)])
    assert _error_of(path) == f"{path}:2: conversation.1.content: empty assistant response"


def test_empty_rejected_response_of_a_pair(tmp_path: Path) -> None:
    line = {
        "kind": "pair",
        "id": "p",
        "prompt": [{"role": "user", "content": "Q"}],
        "chosen": "A",
        "rejected": "",
    }
    path = _write_lines(tmp_path / "d.jsonl", [json.dumps(line)])
    assert _error_of(path) == f"{path}:1: rejected: empty rejected response"


def test_missing_image_file_is_resolved_next_to_the_jsonl(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "red.png", tmp_path / "red.png")
    ok = _sample_line(id="ok", images=[{"path": "red.png"}])
    ok["conversation"] = [
        {"role": "user", "content": [{"type": "image"}]},
        {"role": "assistant", "content": "A"},
    ]
    bad = dict(ok, id="bad", images=[{"path": "red.png"}, {"path": "imgs/missing.png"}])
    bad["conversation"] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}]},
        {"role": "assistant", "content": "A"},
    ]
    path = _write_lines(tmp_path / "d.jsonl", [json.dumps(ok), json.dumps(bad)])
    expected = f"{path}:2: images.1.path: image file not found: {tmp_path / 'imgs/missing.png'}"
    assert _error_of(path) == expected
    assert [r.id for r in read_jsonl(path, check_images=False)] == ["ok", "bad"]


def test_image_count_mismatch(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "red.png", tmp_path / "red.png")
    line = _sample_line(images=[{"path": "red.png"}])  # no image part in the conversation
    path = _write_lines(tmp_path / "d.jsonl", [json.dumps(line)])
    assert _error_of(path) == f"{path}:1: images: 0 image part(s) in the conversation but 1 image(s) given"


def test_wrong_kind_against_requested_kind(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "d.jsonl", [json.dumps(_sample_line())])
    assert _error_of(path, kind="pair") == f"{path}:1: kind: expected kind 'pair', got 'sample'"


def test_unknown_and_missing_kind(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "d.jsonl", [json.dumps(_sample_line(kind="essay"))])
    assert _error_of(path).startswith(f"{path}:1: kind: unknown kind 'essay'")
    line = _sample_line()
    del line["kind"]
    path = _write_lines(tmp_path / "e.jsonl", [json.dumps(line)])
    assert _error_of(path) == f"{path}:1: kind: missing 'kind' (or pass kind=... to the reader)"
    assert read_jsonl(path, kind="sample")[0].kind == "sample"


def test_non_object_line(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "d.jsonl", ["[1, 2]"])
    assert _error_of(path) == f"{path}:1: expected a JSON object, got list"


def _pair_with_embedded_image() -> PreferencePair:
    return PreferencePair(
        id="p/1",
        images=[ImageRef(png=(FIXTURES / "red.png").read_bytes())],
        prompt=[Message.user("What is it?", n_images=1)],
        chosen="A red square.",
        rejected="A green square.",
        rejected_spans=[(2, 7)],
        scores={"chosen": {"correctness": 5.0}, "rejected": {"correctness": 1.0}},
        critique={"rejected": "wrong colour"},
        facts=["The square is red."],
        margin=4.0,
        meta={"seed": 3},
    )


def test_write_then_read_round_trips_embedded_png_as_base64(tmp_path: Path) -> None:
    pair = _pair_with_embedded_image()
    path = tmp_path / "out" / "pairs.jsonl"
    write_jsonl(path, [pair])
    raw = json.loads(path.read_text())
    assert isinstance(raw["images"][0]["png"], str)  # base64 text, not raw bytes
    assert "path" not in raw["images"][0]
    assert read_jsonl(path) == [pair]
    assert sorted(p.name for p in path.parent.iterdir()) == ["pairs.jsonl"]  # no temp file left


def test_write_jsonl_failing_midway_leaves_nothing_behind(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("old content\n")

    def records() -> Iterator[Sample]:
        yield Sample.model_validate(_sample_line(id="first"))
        raise RuntimeError("serialisation failed")

    with pytest.raises(RuntimeError, match="serialisation failed"):
        write_jsonl(path, records())
    assert path.read_text() == "old content\n"
    assert [p.name for p in tmp_path.iterdir()] == ["d.jsonl"]

    with pytest.raises(RuntimeError):
        write_jsonl(tmp_path / "new.jsonl", records())
    assert [p.name for p in tmp_path.iterdir()] == ["d.jsonl"]


def test_embed_then_externalise_images_keeps_pixels(tmp_path: Path) -> None:
    records = read_jsonl(FIXTURES / "pairs.jsonl")
    embedded = embed_images(records, FIXTURES)
    assert embedded[0].images[0].png == (FIXTURES / "red.png").read_bytes()
    assert embedded[0].images[1].png == (FIXTURES / "blue.png").read_bytes()
    assert records[0].images[0].path == "red.png"  # the input is not modified

    out = externalise_images(embedded, tmp_path / "imgs", relative_to=tmp_path)
    assert [ref.path for ref in out[0].images] == ["imgs/p1_0.png", "imgs/p1_1.png"]
    write_jsonl(tmp_path / "pairs.jsonl", out)
    again = read_jsonl(tmp_path / "pairs.jsonl")
    assert again[0].images[1].load(tmp_path).getpixel((3, 3)) == (0, 0, 255)
    assert again[0].model_dump(exclude={"images"}) == records[0].model_dump(exclude={"images"})


def test_hf_dataset_round_trip_for_pairs_with_png_bytes() -> None:
    pair = _pair_with_embedded_image()
    plain = read_jsonl(FIXTURES / "pairs.jsonl")[0]
    ds = to_hf_dataset([pair, plain])
    assert ds.num_rows == 2
    assert ds[0]["images"][0]["png"] == pair.images[0].png
    assert json.loads(ds[0]["rejected_spans"]) == [[2, 7]]
    assert from_hf_dataset(ds, "pair") == [pair, plain]


def test_hf_dataset_round_trip_for_samples_with_paths() -> None:
    records = read_jsonl(FIXTURES / "samples.jsonl")
    ds = to_hf_dataset(records)
    assert ds[1]["images"] == []
    assert from_hf_dataset(ds, "sample") == records


def test_hf_dataset_round_trip_for_rankings_and_dialogues() -> None:
    ranking = Ranking(
        id="r",
        prompt=[Message.user("Q?")],
        responses=["a", "b", "c"],
        scores=[{"helpful": 1.0}, {"helpful": 3.5}, {}],
    )
    dialogue = Dialogue(
        id="d",
        conversation=[
            Message.user("Q1"),
            Message.assistant("A1"),
            Message.user("Q2"),
            Message.assistant("A2"),
        ],
        truths=[{"answer": "yes", "depends_on": []}, {"answer": 2, "depends_on": [0]}],
    )
    assert from_hf_dataset(to_hf_dataset([ranking]), "ranking") == [ranking]
    assert from_hf_dataset(to_hf_dataset([dialogue]), "dialogue") == [dialogue]


def test_hf_dataset_refuses_mixed_kinds() -> None:
    records = [*read_jsonl(FIXTURES / "samples.jsonl"), *read_jsonl(FIXTURES / "pairs.jsonl")]
    with pytest.raises(DataError, match="cannot mix record kinds"):
        to_hf_dataset(records)


def test_from_hf_dataset_with_wrong_kind_names_the_row() -> None:
    ds = to_hf_dataset(read_jsonl(FIXTURES / "samples.jsonl"))
    with pytest.raises(DataError, match=r"<dataset>:0: kind: expected kind 'pair', got 'sample'"):
        from_hf_dataset(ds, "pair")
