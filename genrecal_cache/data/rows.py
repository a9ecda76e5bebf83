"""Turn a manifest row into a normalised sample: messages in the transformers format plus images.

Accepts the transformers `messages` format (OpenAI `image_url` parts and `<image>` markers in string content
included), the LLaVA/ShareGPT `conversations` format, and flat question/answer tables through a column mapping;
a bad row raises `RejectError` with the reason, so the job can record it and go on. Rows come from `sources.py`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from genrecal_cache.core.errors import RejectError

ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
IMAGE_MARKER = "<image>"
_BASE64 = re.compile(r"[A-Za-z0-9+/\s]+={0,2}\s*")


@dataclass
class ImageRef:
    """One image of a sample: its encoded bytes, where it came from, and a content digest."""

    data: bytes
    path: str | None = None
    digest: str = ""
    _rgb: Image.Image | None = field(default=None, repr=False, compare=False)  # decoded once, not pickled

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = hashlib.sha256(self.data).hexdigest()

    def load(self) -> Image.Image:
        """The image as RGB, decoded on first use (parse_row decodes it to check it, and keeps it)."""
        if self._rgb is None:
            self._rgb = Image.open(io.BytesIO(self.data)).convert("RGB")
        return self._rgb

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_rgb": None}  # bytes travel between processes, pixels are decoded again


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


@dataclass(frozen=True)
class Columns:
    """Which columns of a flat table hold the question, the answer, the image(s), the id and a system prompt
    (`--columns question=q,answer=a,image=img`); a row with `messages` or `conversations` ignores them."""

    question: str = "question"
    answer: str = "answer"
    image: str = "image"
    id: str = "id"
    system: str = "system"

    @classmethod
    def parse(cls, text: str) -> Columns:
        """From `name=column,...`; unnamed fields keep their defaults."""
        names = {f for f in cls.__dataclass_fields__}
        kw = {}
        for item in filter(None, (x.strip() for x in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key.strip() not in names or not value.strip():
                raise ValueError(f"--columns: {item!r} is not NAME=COLUMN with NAME one of {', '.join(sorted(names))}")
            kw[key.strip()] = value.strip()
        return cls(**kw)


def row_id(record: Any, id_column: str = "id") -> str | None:
    """A record's own id as a string (None when it has none)."""
    value = record.get(id_column) if isinstance(record, dict) else None
    return None if value is None else str(value)


def row_sample_id(row: Row, id_column: str = "id") -> str:
    """The row's own id, or `row-<index>` when it has none (or could not be decoded)."""
    return row_id(row.record, id_column) or f"row-{row.index}"


def parse_row(row: Row, root: Path, allow_outside_root: bool = False, need_answer: bool = True, *,
              columns: Columns | None = None, allow_remote_images: bool = False,
              sample_id: str | None = None) -> Sample:
    """Turn a manifest row into a `Sample`; images are read and decoded now so bad ones are rejected early.

    Image paths resolve against `root` (the image root: the manifest's folder unless --image-root) and may not
    leave it (`..`, absolute paths or links elsewhere) unless `allow_outside_root`: a manifest from elsewhere
    cannot make the job read any file. http(s) images are fetched only with `allow_remote_images`. Without
    `need_answer` (the teacher writes the answer) a conversation may end with a user turn. `sample_id` replaces
    the row's own (a renamed duplicate)."""
    if row.error is not None:
        raise RejectError(row.error)
    rec = row.record
    if not isinstance(rec, dict):
        raise RejectError(f"row is a {type(rec).__name__}, not an object")
    columns = columns or Columns()
    sample_id = sample_id or row_sample_id(row, columns.id)
    listed = _image_list(rec)
    if rec.get("messages") is not None:
        messages, inline = _parse_messages(_maybe_json(rec["messages"], "messages"))
        fmt = "messages"
    elif rec.get("conversations") is not None:
        messages, inline = _parse_llava(_maybe_json(rec["conversations"], "conversations"))
        fmt = "conversations"
    elif rec.get(columns.question) is not None:
        messages, inline, listed = _parse_flat(rec, columns, need_answer)
        fmt = "the flat row"
    else:
        raise RejectError(f"row has neither 'messages' (transformers format), 'conversations' (LLaVA format) nor a "
                          f"'{columns.question}' column (a flat table: map its columns with --columns "
                          "question=...,answer=...,image=...); its keys: " + ", ".join(sorted(map(str, rec))[:12]))
    images = [_load_image(src, root, i, allow_outside_root, allow_remote_images)
              for i, src in enumerate(_assign_images(inline, listed, fmt))]
    _check_turns(messages, need_answer)
    return Sample(sample_id, row.index, messages, images)


def _parse_flat(rec: dict, columns: Columns, need_answer: bool) -> tuple[list[dict], list[Any], list[Any]]:
    """A VQA table row: one user turn (its images first, then the question), one assistant turn (the answer;
    the first of a list of reference answers)."""
    question = rec[columns.question]
    if not isinstance(question, str):
        raise RejectError(f"column '{columns.question}' (the question) holds a {type(question).__name__}, not text")
    answer = rec.get(columns.answer)
    if isinstance(answer, (list, tuple)):
        answer = answer[0] if answer else None
    if isinstance(answer, dict):  # e.g. {"answer": ..., "answer_id": ...}
        answer = answer.get("answer", answer.get("text"))
    if answer is None and need_answer:
        raise RejectError(f"column '{columns.answer}' (the answer) is missing or empty; map it with --columns "
                          "answer=COLUMN")
    value = rec.get(columns.image)
    listed = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
    user = [{"type": "image"} for _ in listed] + [{"type": "text", "text": question}]
    messages = []
    if isinstance(rec.get(columns.system), str) and rec[columns.system]:
        messages.append({"role": "system", "content": [{"type": "text", "text": rec[columns.system]}]})
    messages.append({"role": "user", "content": user})
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": str(answer)}]})
    return messages, [None] * len(listed), listed


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
    """transformers/OpenAI format: content a string (`<image>` markers become image parts, LLaMA-Factory style)
    or a list of parts; an image part carries its source under 'image', 'path' or 'url', an OpenAI `image_url`
    part under 'image_url' ({url} or a string)."""
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
            content = _marker_parts(content)
        if not isinstance(content, list):
            raise RejectError(f"content of turn {turn} must be a string or a list of parts")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise RejectError(f"text part of turn {turn} has no string 'text'")
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image", "image_url"):
                parts.append({"type": "image"})
                inline.append(_inline_source(part))
            else:
                raise RejectError(f"turn {turn} has a part that is not {{type: text|image|image_url}}: "
                                  f"{str(part)[:80]!r}")
        messages.append({"role": role, "content": parts})
    return messages, inline


def _inline_source(part: dict) -> Any:
    """Where an image part's image is (None: the next of the row's `images`)."""
    if part["type"] == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    return next((part[k] for k in ("image", "path", "url") if part.get(k) is not None), None)


def _marker_parts(value: str) -> list[dict]:
    """Text with `<image>` markers as text and image parts ("<image>\nQuestion" is the usual layout: the newline
    next to a marker goes with it)."""
    parts: list[dict] = []
    pieces = value.split(IMAGE_MARKER)
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append({"type": "image"})
            piece = piece.removeprefix("\n")
        if i < len(pieces) - 1:
            piece = piece.removesuffix("\n")
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _parse_llava(raw: Any) -> tuple[list[dict], list[Any]]:
    """LLaVA/ShareGPT format: `from` human|gpt|system, `value` text with `<image>` markers."""
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
        parts = _marker_parts(value)
        inline += [None for p in parts if p["type"] == "image"]
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


def _load_image(src: Any, root: Path, i: int, allow_outside_root: bool = False,
                allow_remote: bool = False) -> ImageRef:
    """An image from a path (relative to the image root, absolute, or file://), raw bytes, a {bytes, path}
    struct (datasets' Image), base64, a data URI, or (with `allow_remote`) an http(s) URL."""
    path: str | None = None
    if isinstance(src, dict):  # Parquet/HF datasets style {"bytes": ..., "path": ...}
        src = src.get("bytes") or src.get("path")
    if isinstance(src, (bytes, bytearray)):
        data = bytes(src)
    elif isinstance(src, str) and src.startswith("data:"):
        data = _b64(src.split(",", 1)[-1], i)
    elif isinstance(src, str) and src.startswith(("http://", "https://")):
        data = _fetch(src, i, allow_remote)
    elif isinstance(src, str) and src:
        name = src.removeprefix("file://")
        p = Path(name) if Path(name).is_absolute() else root / name
        if not allow_outside_root and _is_file(p) and not p.resolve().is_relative_to(root.resolve()):
            raise RejectError(f"image {i} ({name}) is outside the dataset root {root}; pass --allow-outside-root "
                              "if the manifest is trusted (or --image-root the folder that holds the images)")
        if _is_file(p):
            try:
                data, path = p.read_bytes(), str(p.resolve())
            except OSError as e:
                raise RejectError(f"image {i} cannot be read: {p} ({e.strerror or e})") from None
        elif len(src) >= 64 and _BASE64.fullmatch(src):
            data = _b64(src, i)
        else:
            raise RejectError(f"image {i} is not a file under the image root ({p} does not exist; set --image-root "
                              f"to the folder the paths are relative to), and not base64: {src[:80]!r}")
    else:
        raise RejectError(f"image {i} has an unsupported source of type {type(src).__name__}")
    ref = ImageRef(data, path)
    try:
        ref.load()
    except Exception as e:  # PIL raises many types for bad bytes
        raise RejectError(f"cannot decode image {i} ({type(e).__name__}: {str(e)[:120]})") from None
    return ref


def _fetch(url: str, i: int, allow_remote: bool) -> bytes:
    if not allow_remote:
        raise RejectError(f"image {i} is a remote URL ({url[:100]}); pass --allow-remote-images to fetch it")
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 (http/https only, checked above)
            return r.read()
    except Exception as e:  # URLError, timeouts, HTTP errors
        raise RejectError(f"image {i} could not be fetched from {url[:100]} ({type(e).__name__}: "
                          f"{str(e)[:120]})") from None


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
        raise RejectError(f"image {i} is not a file under the image root, and not base64 (it does not decode): "
                          f"{text[:80]!r}") from None


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
