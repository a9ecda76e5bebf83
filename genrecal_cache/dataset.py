"""Read a manifest (JSONL or Parquet) into normalised samples: messages in the transformers format plus images.

Accepts the transformers messages format and the LLaVA `conversations` format; a bad row raises `RejectError`
with the reason, so the job can record it and go on.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import DatasetError, RejectError

ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
IMAGE_MARKER = "<image>"
_BASE64 = re.compile(r"[A-Za-z0-9+/\s]+={0,2}\s*")


@dataclass
class ImageRef:
    """One image of a sample: its encoded bytes, where it came from, and a content digest."""

    data: bytes
    path: str | None = None
    digest: str = ""

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = hashlib.sha256(self.data).hexdigest()

    def load(self) -> Image.Image:
        return Image.open(io.BytesIO(self.data)).convert("RGB")


@dataclass
class Sample:
    """A normalised conversation: roles in {system, user, assistant}; content a list of image/text parts."""

    sample_id: str
    source_row: int
    messages: list[dict[str, Any]]
    images: list[ImageRef] = field(default_factory=list)


@dataclass
class Row:
    """A raw manifest row: the decoded record, or why it could not be decoded."""

    index: int
    record: dict[str, Any] | None
    error: str | None = None


def read_manifest(path: Path | str) -> Iterator[Row]:
    """Yield every row of a JSONL (`.jsonl`, `.json`) or Parquet (`.parquet`) manifest, in order."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"manifest not found: {path} (pass an existing .jsonl or .parquet file to --manifest)")
    if path.suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        yield from _read_jsonl(path)


def _read_jsonl(path: Path) -> Iterator[Row]:
    with path.open("rb") as f:
        for index, raw in enumerate(f):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Row(index, None, f"line {index + 1} is not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                yield Row(index, None, f"line {index + 1} is empty")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield Row(index, None, f"malformed JSON on line {index + 1}: {e.msg} at column {e.colno}")
                continue
            if not isinstance(record, dict):
                yield Row(index, None, f"line {index + 1} is a JSON {type(record).__name__}, not an object")
                continue
            yield Row(index, record)


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DatasetError(f"cannot read Parquet manifest {path}: {e}") from e
    index = 0
    for batch in pf.iter_batches(batch_size=256):
        for record in batch.to_pylist():
            yield Row(index, record)
            index += 1


def scan_ids(path: Path | str) -> tuple[int, dict[int, int]]:
    """One pass over the manifest: its row count, and each row whose id already appeared, mapped to the row
    where it first did. Every shard computes the same answer, so a duplicate is rejected whichever shard owns it."""
    path = Path(path)
    first: dict[str, int] = {}
    dups: dict[int, int] = {}
    n = 0
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        n = pf.metadata.num_rows
        if "id" in pf.schema_arrow.names:
            ids = [str(x) if x is not None else None for x in pq.read_table(path, columns=["id"])["id"].to_pylist()]
        else:
            ids = [None] * n
        rows = ((i, Row(i, {"id": x})) for i, x in enumerate(ids))
    else:
        rows = ((r.index, r) for r in read_manifest(path))
    for index, row in rows:
        n = max(n, index + 1)
        sid = row_sample_id(row)
        if sid in first:
            dups[index] = first[sid]
        else:
            first[sid] = index
    return n, dups


def row_sample_id(row: Row) -> str:
    """The row's own `id`, or `row-<index>` when it has none (or could not be decoded)."""
    rec = row.record if isinstance(row.record, dict) else {}
    return str(rec["id"]) if rec.get("id") is not None else f"row-{row.index}"


def parse_row(row: Row, root: Path, allow_outside_root: bool = False, need_answer: bool = True) -> Sample:
    """Turn a manifest row into a `Sample`; images are read and decoded now so bad ones are rejected early.

    Image paths resolve against `root` (the manifest's folder) and may not leave it (`..`, absolute paths or
    links elsewhere) unless `allow_outside_root`: a manifest from elsewhere cannot make the job read any file.
    Without `need_answer` (the teacher writes the answer) a conversation may end with a user turn."""
    if row.error is not None:
        raise RejectError(row.error)
    rec = row.record
    if not isinstance(rec, dict):
        raise RejectError(f"row is a {type(rec).__name__}, not an object")
    sample_id = row_sample_id(row)
    if "messages" in rec and rec["messages"] is not None:
        messages, inline = _parse_messages(_maybe_json(rec["messages"], "messages"))
        fmt = "messages"
    elif "conversations" in rec and rec["conversations"] is not None:
        messages, inline = _parse_llava(_maybe_json(rec["conversations"], "conversations"))
        fmt = "conversations"
    else:
        raise RejectError("row has neither 'messages' (transformers format) nor 'conversations' (LLaVA format)")
    listed = _image_list(rec)
    images = [_load_image(src, root, i, allow_outside_root)
              for i, src in enumerate(_assign_images(inline, listed, fmt))]
    _check_turns(messages, need_answer)
    return Sample(sample_id, row.index, messages, images)


def _maybe_json(value: Any, name: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise RejectError(f"'{name}' is a string but not valid JSON: {e.msg}") from None
    return value


def _role(raw: Any, turn: int) -> str:
    if not isinstance(raw, str) or raw.lower() not in ROLES:
        raise RejectError(f"unknown role {raw!r} in turn {turn} (expected one of {sorted(ROLES)})")
    return ROLES[raw.lower()]


def _parse_messages(raw: Any) -> tuple[list[dict], list[Any]]:
    """transformers format; an image part may carry its source under 'image', 'path' or 'url'."""
    if not isinstance(raw, list) or not raw:
        raise RejectError("'messages' must be a non-empty list of {role, content} objects")
    messages, inline = [], []
    for turn, m in enumerate(raw):
        if not isinstance(m, dict):
            raise RejectError(f"turn {turn} is a {type(m).__name__}, not a {{role, content}} object")
        role = _role(m.get("role"), turn)
        content = m.get("content")
        if content is None:
            content = []
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise RejectError(f"content of turn {turn} must be a string or a list of parts")
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
                raise RejectError(f"turn {turn} has a part that is not {{type: text|image}}: {str(part)[:80]!r}")
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise RejectError(f"text part of turn {turn} has no string 'text'")
                parts.append({"type": "text", "text": part["text"]})
            else:
                parts.append({"type": "image"})
                inline.append(next((part[k] for k in ("image", "path", "url") if part.get(k) is not None), None))
        messages.append({"role": role, "content": parts})
    return messages, inline


def _parse_llava(raw: Any) -> tuple[list[dict], list[Any]]:
    """LLaVA format: `from` human|gpt|system, `value` text with `<image>` markers."""
    if not isinstance(raw, list) or not raw:
        raise RejectError("'conversations' must be a non-empty list of {from, value} objects")
    messages, inline = [], []
    for turn, m in enumerate(raw):
        if not isinstance(m, dict):
            raise RejectError(f"turn {turn} is a {type(m).__name__}, not a {{from, value}} object")
        role = _role(m.get("from", m.get("role")), turn)
        value = m.get("value", "")
        if not isinstance(value, str):
            raise RejectError(f"'value' of turn {turn} must be a string")
        parts: list[dict] = []
        pieces = value.split(IMAGE_MARKER)
        for i, piece in enumerate(pieces):
            if i > 0:
                parts.append({"type": "image"})
                inline.append(None)
                piece = piece.removeprefix("\n")  # "<image>\nQuestion" is the usual layout
            if i < len(pieces) - 1:
                piece = piece.removesuffix("\n")
            if piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": parts})
    return messages, inline


def _image_list(rec: dict) -> list[Any]:
    value = rec.get("images", rec.get("image"))
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _assign_images(inline: list[Any], listed: list[Any], fmt: str) -> list[Any]:
    """Pair each image placeholder with its source: inline in the part, else the next of the row's images."""
    queue = list(listed)
    sources = []
    for src in inline:
        if src is None:
            if not queue:
                raise RejectError(
                    f"{len(inline)} image placeholder(s) in '{fmt}' but {len(listed)} image(s) in the row"
                )
            src = queue.pop(0)
        sources.append(src)
    if queue:
        raise RejectError(f"{len(inline)} image placeholder(s) in '{fmt}' but {len(listed)} image(s) in the row")
    return sources


def _load_image(src: Any, root: Path, i: int, allow_outside_root: bool = False) -> ImageRef:
    """An image from a path (relative to the manifest or absolute), raw bytes, base64 or a data URI."""
    path: str | None = None
    if isinstance(src, dict):  # Parquet/HF datasets style {"bytes": ..., "path": ...}
        src = src.get("bytes") or src.get("path")
    if isinstance(src, (bytes, bytearray)):
        data = bytes(src)
    elif isinstance(src, str) and src.startswith("data:"):
        data = _b64(src.split(",", 1)[-1], i)
    elif isinstance(src, str) and src:
        p = Path(src) if Path(src).is_absolute() else root / src
        if not allow_outside_root and _is_file(p) and not p.resolve().is_relative_to(root.resolve()):
            raise RejectError(f"image {i} ({src}) is outside the dataset root {root}; pass --allow-outside-root "
                              "if the manifest is trusted")
        if _is_file(p):
            try:
                data, path = p.read_bytes(), str(p.resolve())
            except OSError as e:
                raise RejectError(f"image {i} cannot be read: {p} ({e.strerror or e})") from None
        elif len(src) >= 64 and _BASE64.fullmatch(src):
            data = _b64(src, i)
        else:
            raise RejectError(f"image {i} not found: {p}")
    else:
        raise RejectError(f"image {i} has an unsupported source of type {type(src).__name__}")
    ref = ImageRef(data, path)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:  # PIL raises many types for bad bytes
        raise RejectError(f"image {i} cannot be decoded ({type(e).__name__}: {str(e)[:120]})") from None
    return ref


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except OSError:  # e.g. a name too long to be a path
        return False


def _b64(text: str, i: int) -> bytes:
    text = "".join(text.split())  # MIME-wrapped base64 has newlines
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise RejectError(f"image {i} is neither an existing file nor valid base64") from None


def _check_turns(messages: list[dict], need_answer: bool = True) -> None:
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers and need_answer:
        raise RejectError("conversation has no assistant turn (nothing to distil)")
    for turn, m in enumerate(messages):
        if m["role"] == "assistant":
            if any(p["type"] == "image" for p in m["content"]):
                raise RejectError(f"assistant turn {turn} contains an image; only user turns may")
            if not "".join(p["text"] for p in m["content"]).strip():
                raise RejectError(f"assistant turn {turn} is empty")
