"""Reading and writing mmalign records: validated JSONL files, image storage conversions and
Hugging Face ``datasets`` round trips.

Every reader validates each line with the pydantic schema and reports problems as
``mmalign.errors.DataError`` with the message ``file:line: field: problem`` (``field`` is the dotted
pydantic location, e.g. ``conversation.1.role``). Image paths are relative to the JSONL file's folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pydantic import BaseModel, ValidationError

from mmalign.atomic import atomic_write_lines
from mmalign.data.schema import RECORD_TYPES, FieldProblem, ImageRef, Record
from mmalign.errors import DataError

if TYPE_CHECKING:
    import datasets

__all__ = [
    "embed_images",
    "externalise_images",
    "from_hf_dataset",
    "iter_jsonl",
    "parse_record",
    "read_jsonl",
    "save_images",
    "to_hf_dataset",
    "write_jsonl",
]


def _first_problem(err: ValidationError) -> tuple[str, str]:
    """(dotted field, problem) of the first error pydantic found."""
    first = err.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, FieldProblem):
        return cause.field, str(cause)
    field = ".".join(str(part) for part in first["loc"])
    problem = first["msg"].removeprefix("Value error, ")
    if first["type"] == "literal_error" and first["loc"] and first["loc"][-1] == "role":
        problem = f"unknown role {first['input']!r} ({problem.lower()})"
    return field, problem


def parse_record(
    obj: Any,
    kind: str | None = None,
    *,
    file: str | None = None,
    line: int | None = None,
    base_dir: Path | None = None,
) -> Record:
    """Validate one decoded JSON object as a record.

    The record type comes from the object's ``kind`` field, or from ``kind`` when the object has none;
    when both are given they must agree. With ``base_dir`` set, path images must exist under it.
    """
    where: dict[str, Any] = {"file": file, "line": line}
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", **where)
    found = obj.get("kind")
    if kind is not None and kind not in RECORD_TYPES:
        raise DataError(f"unknown kind {kind!r} requested (one of {sorted(RECORD_TYPES)})", **where)
    if found is not None and found not in RECORD_TYPES:
        raise DataError(f"unknown kind {found!r} (one of {sorted(RECORD_TYPES)})", field="kind", **where)
    if kind is not None and found is not None and found != kind:
        raise DataError(f"expected kind {kind!r}, got {found!r}", field="kind", **where)
    record_kind = found or kind
    if record_kind is None:
        raise DataError("missing 'kind' (or pass kind=... to the reader)", field="kind", **where)
    try:
        record = cast(Record, RECORD_TYPES[record_kind].model_validate(obj))
    except ValidationError as err:
        field, problem = _first_problem(err)
        raise DataError(problem, field=field or None, **where) from None
    if base_dir is not None:
        for k, ref in enumerate(record.images):
            path = ref.resolve(base_dir)
            if path is not None and not path.is_file():
                raise DataError(f"image file not found: {path}", field=f"images.{k}.path", **where)
    return record


def iter_jsonl(path: str | Path, kind: str | None = None, *, check_images: bool = True) -> Iterator[Record]:
    """Stream validated records from a JSONL file (blank lines are skipped)."""
    path = Path(path)
    base_dir = path.parent if check_images else None
    with path.open(encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"malformed JSON: {err.msg} at column {err.colno}", file=str(path), line=lineno
                ) from None
            yield parse_record(obj, kind, file=str(path), line=lineno, base_dir=base_dir)


def read_jsonl(path: str | Path, kind: str | None = None, *, check_images: bool = True) -> list[Record]:
    """All validated records of a JSONL file; see ``iter_jsonl``."""
    return list(iter_jsonl(path, kind, check_images=check_images))


def _to_json_line(record: BaseModel) -> str:
    return json.dumps(record.model_dump(mode="json", exclude_none=True), ensure_ascii=False)


def write_jsonl(path: str | Path, records: Iterable[Record]) -> None:
    """Write records atomically: to a temporary file in the same folder, fsync, then ``os.replace``.

    If anything fails (e.g. a record cannot be serialised) the temporary file is removed and an existing
    file at ``path`` is left untouched.
    """
    atomic_write_lines(path, (_to_json_line(record) for record in records))


# --------------------------------------------------------------------------------------- images


def embed_images(records: Iterable[Record], base_dir: str | Path | None) -> list[Record]:
    """Copies of the records with every path image replaced by its PNG bytes (paths relative to
    ``base_dir``). Files that are PNGs already are embedded byte for byte; others are re-encoded."""
    base = Path(base_dir) if base_dir is not None else None
    out: list[Record] = []
    for record in records:
        images = []
        for ref in record.images:
            path = ref.resolve(base)
            if path is None:
                images.append(ref)
            elif path.suffix.lower() == ".png":
                images.append(ImageRef(png=path.read_bytes()))
            else:
                images.append(ImageRef.from_pil(ref.load(base)))
        out.append(record.model_copy(update={"images": images}))
    return out


def externalise_images(
    records: Iterable[Record], out_dir: str | Path, *, relative_to: str | Path | None = None
) -> list[Record]:
    """Copies of the records with every embedded PNG written to ``out_dir/<id>_<k>.png`` and replaced by
    its path, relative to ``relative_to`` (default ``out_dir``; pass the folder of the JSONL file you will
    write). Path images are left as they are."""
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    rel_base = Path(relative_to) if relative_to is not None else out_path
    out: list[Record] = []
    for record in records:
        images = []
        for k, ref in enumerate(record.images):
            if ref.png is None:
                images.append(ref)
                continue
            safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in record.id)
            file = out_path / f"{safe_id}_{k}.png"
            file.write_bytes(ref.png)
            images.append(ImageRef(path=os.path.relpath(file, rel_base)))
        out.append(record.model_copy(update={"images": images}))
    return out


save_images = externalise_images
"""Alias of ``externalise_images`` (the name used in docs/CONTRACTS.md)."""


# ------------------------------------------------------------------------------ HF datasets


_PLAIN_COLUMNS = {"id", "kind", "chosen", "rejected", "source", "margin"}
"""Columns stored as they are; every other field (nested content) is stored as a JSON string."""


def _features(kind: str) -> datasets.Features:
    import datasets

    model = RECORD_TYPES[kind]
    cols: dict[str, Any] = {}
    for name in model.model_fields:
        if name == "images":
            cols[name] = datasets.List({"path": datasets.Value("string"), "png": datasets.Value("binary")})
        elif name == "margin":
            cols[name] = datasets.Value("float64")
        else:
            cols[name] = datasets.Value("string")
    return datasets.Features(cols)


def to_hf_dataset(records: Iterable[Record]) -> datasets.Dataset:
    """A ``datasets.Dataset`` with one row per record (all records must have the same kind). Images are a
    list of ``{path, png}`` structs (PNG bytes or a path); nested fields are JSON strings."""
    import datasets

    rows: list[dict[str, Any]] = []
    kinds: set[str] = set()
    for record in records:
        kinds.add(record.kind)
        row: dict[str, Any] = {}
        for name in type(record).model_fields:
            value = getattr(record, name)
            if name == "images":
                row[name] = [{"path": ref.path, "png": ref.png} for ref in value]
            elif name in _PLAIN_COLUMNS:
                row[name] = value
            else:
                row[name] = json.dumps(record.model_dump(mode="json", include={name})[name])
        rows.append(row)
    if len(kinds) > 1:
        raise DataError(f"cannot mix record kinds in one dataset: {sorted(kinds)}")
    if not rows:
        raise DataError("no records to convert")
    return datasets.Dataset.from_list(rows, features=_features(kinds.pop()))


def from_hf_dataset(ds: datasets.Dataset, kind: str) -> list[Record]:
    """Validated records from a dataset made by ``to_hf_dataset`` (errors name the row as ``line``)."""
    out: list[Record] = []
    for i, row in enumerate(ds):
        obj: dict[str, Any] = {}
        for name, value in row.items():
            if name == "images":
                obj[name] = [{k: v for k, v in ref.items() if v is not None} for ref in value]
            elif name in _PLAIN_COLUMNS or value is None:
                if value is not None:
                    obj[name] = value
            else:
                try:
                    decoded = json.loads(value)
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"malformed JSON: {err.msg} at column {err.colno}",
                        file="<dataset>",
                        line=i,
                        field=name,
                    ) from None
                if decoded is not None:
                    obj[name] = decoded
        out.append(parse_record(obj, kind, file="<dataset>", line=i))
    return out
