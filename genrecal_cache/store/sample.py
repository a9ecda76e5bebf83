"""One stored sample as the trainer takes it (`TeacherSample`) and its images read back from where they are kept:
the store's own bytes, a local path or an object store URL (`--image-refs`), checked against the stored digest."""

from __future__ import annotations

import hashlib
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from genrecal_cache.core.errors import RejectError
from genrecal_cache.core.locations import Location


@dataclass
class TeacherSample:
    """Everything the trainer needs of one sample; tensors in the store's dtype on CPU."""

    sample_id: str
    source_row: int
    part: str
    messages: list[dict]
    images: list[bytes | None]  # None: read it from image_paths (stores written with --image-refs)
    image_paths: list[str]
    segments: list[dict]
    token_ids: torch.Tensor  # (L,) int64, teacher tokenization, image placeholders expanded
    label_mask: torch.Tensor  # (L,) bool
    features: torch.Tensor  # (A, D) teacher final features at the label positions
    targets: torch.Tensor  # (A,) int64
    topk_ids: torch.Tensor | None  # (A, K)
    topk_logprobs: torch.Tensor | None  # (A, K)
    question_features: torch.Tensor | None  # (P, D), at every position not a label position
    layers: dict[int, torch.Tensor]  # layer -> (A, D)
    answers_generated: bool
    answer_truncated: bool = False
    image_digests: list[str] = field(default_factory=list)  # sha256 of each image's encoded bytes
    # The store's --storage-options, for images stored by reference as URLs on an object store.
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def label_positions(self) -> torch.Tensor:  # (A,)
        return self.label_mask.nonzero().squeeze(1)

    def image_data(self) -> list[bytes]:
        """Each image's encoded bytes: as stored, or read from its stored path (`--image-refs`), which must be a
        regular file still holding the image cached (its sha256 the stored digest); else a RejectError saying
        why. A store names any path: this reads no device or pipe, and never another image."""
        return [data if data is not None else _image_file(path, self.image_digests[k] if k < len(
            self.image_digests) else "", k, self.storage_options)
            for k, (data, path) in enumerate(zip(self.images, self.image_paths))]


def _image_file(path: str, digest: str, k: int, storage_options: dict[str, Any] | None = None) -> bytes:
    if "://" in path and not path.startswith("file://"):
        data = _image_object(path, k, storage_options or {})
        path_ = path
    else:
        data, path_ = _image_local(path, k), path
    now = hashlib.sha256(data).hexdigest()
    if digest and now != digest:
        raise RejectError(f"image {k} at {path_} has changed since the store was written (sha256 {digest[:12]}… "
                          f"then, {now[:12]}… now): restore it, or cache the data again")
    return data


def _image_object(url: str, k: int, storage_options: dict[str, Any]) -> bytes:
    """An image kept by reference on an object store; a server failure is the server's one-line error."""
    try:
        return Location.of(url, storage_options).read_bytes()
    except FileNotFoundError:
        raise RejectError(f"image {k} cannot be read from {url} (no such object); the store keeps only its URL "
                          "(--image-refs): restore the object") from None


def _image_local(path: str, k: int) -> bytes:
    p = Path(path)
    try:
        if not p.is_absolute() or not stat.S_ISREG(p.stat().st_mode):
            raise RejectError(f"image {k}'s stored path {path!r} is not a regular file (the store keeps no bytes "
                              "for it)")
        return p.read_bytes()
    except OSError as e:
        raise RejectError(f"image {k} cannot be read from {path} ({e.strerror or e}); the store keeps only its "
                          "path (--image-refs): restore the file") from None
