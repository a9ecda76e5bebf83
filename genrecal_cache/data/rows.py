"""Turn a manifest row into a normalised sample: messages in the transformers format plus images.

Accepts the transformers `messages` format (OpenAI `image_url` parts and `<image>` markers in string content
included), the LLaVA/ShareGPT `conversations` format, and flat question/answer tables through a column mapping;
a bad row raises `RejectError` with the reason, so the job can record it and go on. Rows come from `sources.py`;
their images are read by `images.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genrecal_cache.core.errors import RejectError

from .images import MAX_BYTES, TIMEOUT_S, ImageRef, load_image

ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
IMAGE_MARKER = "<image>"
MAX_NESTING = 100  # a row nested deeper is a reject: real rows nest < 10 levels; repr, pickle and json recurse


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


def unicode_safe(text: str) -> str:
    """`text` with any lone surrogate written as its escape (`\\ud800`): what can be stored of an invalid id."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def nested_too_deep(value: Any, limit: int = MAX_NESTING) -> bool:
    """Whether `value` nests lists/dicts more than `limit` levels deep (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children)
    return False


def _check_unicode(text: str, what: str) -> None:
    """Text that UTF-8 cannot encode (a lone surrogate, e.g. JSON's "\\ud800") cannot be stored: a reject."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RejectError(f"{what} holds a lone surrogate ({text[e.start].encode('unicode_escape').decode()} at "
                          f"character {e.start}: not valid Unicode text); fix the row") from None


def parse_row(row: Row, root: Path, allow_outside_root: bool = False, need_answer: bool = True, *,
              columns: Columns | None = None, allow_remote_images: bool = False,
              remote_image_timeout: float = TIMEOUT_S, remote_image_max_bytes: int = MAX_BYTES,
              sample_id: str | None = None) -> Sample:
    """Turn a manifest row into a `Sample`; images are read and decoded now so bad ones are rejected early.

    Image paths resolve against `root` (the image root: the manifest's folder unless --image-root) and may not
    leave it (`..`, absolute paths or links elsewhere) unless `allow_outside_root`: a manifest from elsewhere
    cannot make the job read any file. http(s) images are fetched only with `allow_remote_images`, within
    `remote_image_timeout` seconds and `remote_image_max_bytes`. Without `need_answer` (the teacher writes the
    answer) a conversation may end with a user turn. `sample_id` replaces the row's own (a renamed duplicate).
    Text that cannot be stored (lone surrogates) and rows nested deeper than `MAX_NESTING` are rejects."""
    if row.error is not None:
        raise RejectError(row.error)
    rec = row.record
    if not isinstance(rec, dict):
        raise RejectError(f"row is a {type(rec).__name__}, not an object")
    if nested_too_deep(rec):
        raise RejectError(f"row is nested more than {MAX_NESTING} levels deep")
    columns = columns or Columns()
    sample_id = sample_id or row_sample_id(row, columns.id)
    _check_unicode(sample_id, f"sample id {unicode_safe(sample_id)!r}")
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
    for turn, m in enumerate(messages):
        for p in m["content"]:
            if p["type"] == "text":
                _check_unicode(p["text"], f"the text of turn {turn}")
    remote = (remote_image_timeout, remote_image_max_bytes) if allow_remote_images else None
    images = [load_image(src, root, i, allow_outside_root, remote)
              for i, src in enumerate(_assign_images(inline, listed, fmt))]
    for i, im in enumerate(images):
        _check_unicode(im.path or "", f"the path of image {i}")  # a file name that is not UTF-8
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
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RejectError(f"'{name}' is a string but not valid JSON: {e.msg}") from None
        except RecursionError:
            raise RejectError(f"'{name}' is nested more than {MAX_NESTING} levels deep") from None
        if nested_too_deep(value):
            raise RejectError(f"'{name}' is nested more than {MAX_NESTING} levels deep")
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


def stored_sample(t: Any, root: Path) -> Sample:
    """A stored sample (a `TeacherSample`: its source_row, sample_id, messages and image_data()) as the `Sample` a
    renderer takes; RejectError (or ValueError/OSError) if its images cannot be read."""
    return parse_row(Row(t.source_row, {"id": t.sample_id, "messages": t.messages, "images": t.image_data()}), root)
