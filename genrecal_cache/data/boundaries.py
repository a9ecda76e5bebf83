"""Turn boundaries as token positions, from the chat template's text renders of each prefix of a conversation
(docs/DESIGN.md, "Turn boundaries"). The renderer (`render.Renderer`) calls this once per sample; this module
sees it only through the `TemplateRenderer` protocol, so it imports nothing of render.py."""

from __future__ import annotations

import functools
from typing import Any, Protocol

import numpy as np
import torch

from genrecal_cache.core.errors import RejectError


class TemplateRenderer(Protocol):
    """What boundaries read of a renderer (`render.Renderer` is one; see its methods for the details)."""

    tokenizer: Any  # the processor's tokenizer: prefix tokens and the whole encoding's character offsets

    @property
    def image_marker(self) -> str | None:
        """What the chat template writes for one image (None: not found)."""

    @property
    def added_token_ids(self) -> frozenset[int]:
        """Tokens the tokenizer matches before anything else (special and other added tokens)."""

    def template_text(self, msgs: list[dict], generation_prompt: bool) -> str:
        """The chat template's text of `msgs`."""

    def lead(self, text: str) -> int:
        """How many tokens the tokenizer puts before `text`: 0 or 1."""

    def encode(self, text: str, images: list) -> dict[str, torch.Tensor]:
        """The processor's model inputs for `text` and its images."""

    def encode_tapped(self, text: str, images: list) -> tuple[dict[str, torch.Tensor], str | None]:
        """`encode`, and the expanded text the tokenizer was given (None: not one string)."""


class Boundaries:
    """Token positions of one conversation's turn boundaries, from text alone (docs/DESIGN.md, "Turn boundaries").

    Each prefix of the conversation (up to a turn's end, or up to the generation prompt before an answer) is
    rendered as text, which must be a prefix of the whole text. Its end is carried into the processor's expanded
    text (image placeholders replaced by their tokens), which is then tokenised up to there: when those tokens
    are a prefix of the whole conversation's ids, their count is the boundary (as when each prefix was encoded
    with its images). Otherwise the boundary comes from the whole encoding's character offsets: a token
    straddling it is never an answer token (at an answer's start it stays with the prompt, at an answer's end
    it goes to the turn after).
    """

    def __init__(self, renderer: TemplateRenderer, text: str, expanded: str | None, images: list,
                 ids: np.ndarray):
        self.renderer, self.text, self.expanded, self.images, self.ids = renderer, text, expanded, images, ids
        self.stretches = (place_stretches(text, expanded, renderer.image_marker, len(images))
                          if expanded is not None else None)
        self._added_at: np.ndarray | None = None  # positions of added tokens in `ids` (after the lead)
        self.lead = renderer.lead(text)  # tokens before the text's own (a BOS the tokenizer adds)

    def tokens(self, wanted: list[tuple[list[dict], int, bool, int]]) -> list[int]:
        """The token position where each prefix ends: (its turns, how many images they hold, whether the
        generation prompt follows, the turn it is named by in errors)."""
        r = self.renderer
        ends: list[int] = []
        for msgs, n_images, gen, turn in wanted:
            what = "the generation prompt before" if gen else "the end of"
            prefix = r.template_text(msgs, gen)
            if not self.text.startswith(prefix):
                raise RejectError(f"chat template does not render prefixes consistently: the text up to {what} "
                                  f"turn {turn} is not a prefix of the whole conversation's text")
            if self.expanded is None:  # the processor did not show its text: its prefix tokens must be a prefix
                ids = r.encode(prefix, self.images[:n_images])["input_ids"][0].numpy()
                if not self._is_prefix(ids):
                    raise RejectError(f"chat template does not render prefixes consistently: the tokens up to "
                                      f"{what} turn {turn} are not a prefix of the whole conversation's tokens")
                ends.append(len(ids))
                continue
            end = self._carry(len(prefix))
            if end is None:  # the expansion cannot be placed from the text alone: the processor expands it
                _, shown = r.encode_tapped(prefix, self.images[:n_images])
                if shown is None or not self.expanded.startswith(shown):
                    raise RejectError(f"the processor expands the images up to {what} turn {turn} differently "
                                      "from the whole conversation's")
                end = len(shown)
            ends.append(end)
        if self.expanded is None:
            return ends
        # Tokenise each prefix from the last added token (e.g. <|im_end|>) before its end: a tokenizer splits its
        # input at added tokens first, so what comes before one encodes the same whatever follows it.
        starts = [self._resume_at(end) for end in ends]
        pieces = r.tokenizer([self.expanded[at:end] for (at, _), end in zip(starts, ends)],
                             add_special_tokens=False)["input_ids"]
        return [self._token(self.ids[:k].tolist() + list(piece), end, gen, turn)
                for (_, k), piece, end, (_, _, gen, turn) in zip(starts, pieces, ends, wanted)]

    def _resume_at(self, end: int) -> tuple[int, int]:
        """(character, token) where the last added token that ends by character `end` starts; (0, lead) when
        there is none or no character offsets."""
        spans = self._spans
        if spans is None:
            return 0, self.lead
        if self._added_at is None:
            added = np.flatnonzero(np.isin(self.ids, list(self.renderer.added_token_ids)))
            self._added_at = added[added >= self.lead]
        before = self._added_at[spans[self._added_at, 1] <= end]
        return (int(spans[before[-1], 0]), int(before[-1])) if len(before) else (0, self.lead)

    def _token(self, prefix_ids: list[int], end: int, gen: bool, turn: int) -> int:
        """The boundary at character `end` of the expanded text, whose prefix up to there encodes to `prefix_ids`."""
        if self._is_prefix(prefix_ids):
            return len(prefix_ids)
        offsets = self._spans
        if offsets is None:
            what = "the generation prompt before" if gen else "the end of"
            raise RejectError(f"chat template does not render prefixes consistently: the tokens up to {what} turn "
                              f"{turn} are not a prefix of the whole conversation's tokens (and the tokenizer "
                              "gives no character offsets to place the boundary)")
        if gen:  # the answer starts at the first token that begins at or after the boundary
            after = np.flatnonzero(offsets[:, 0] >= end)
            return int(after[0]) if len(after) else len(offsets)
        return int((offsets[:, 1] <= end).sum())  # the turn ends after the last token that ends by then

    def _is_prefix(self, ids: Any) -> bool:
        ids = np.asarray(ids)
        return len(ids) <= len(self.ids) and np.array_equal(ids, self.ids[: len(ids)])

    def _carry(self, pos: int) -> int | None:
        """Where character `pos` of the text sits in the expanded text (None: not known from text alone)."""
        for t_start, length, x_start in self.stretches or ():
            if t_start <= pos <= t_start + length:
                return None if x_start is None else x_start + pos - t_start
        return None

    @functools.cached_property
    def _spans(self) -> np.ndarray | None:
        """The whole encoding's (start, end) character spans in the expanded text (L, 2), when the tokenizer
        gives them (fast tokenizers do) and its ids are the processor's."""
        tok = self.renderer.tokenizer
        if not getattr(tok, "is_fast", False):
            return None
        enc = tok(self.expanded, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) != self.ids[self.lead :].tolist():
            return None
        spans = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        return np.concatenate([np.zeros((self.lead, 2), dtype=np.int64), spans])  # the lead spans no text


def place_stretches(text: str, expanded: str, marker: str | None, n_images: int
               ) -> list[tuple[int, int, int | None]] | None:
    """The stretches of `text` between image markers, each as (start in text, length, start in `expanded` or
    None when the expansion admits more than one placement); None when `expanded` is not `text` with each marker
    replaced by some non-empty string. Placements are found leftmost-first and rightmost-first: where the two
    agree, the stretch has only one."""
    pieces = text.split(marker) if n_images and marker else [text]
    if len(pieces) != n_images + 1 or not expanded.startswith(pieces[0]) or not expanded.endswith(pieces[-1]):
        return None
    if len(pieces) == 1:
        return [(0, len(text), 0)] if expanded == text else None
    last = len(expanded) - len(pieces[-1])
    left, pos = [0], len(pieces[0])
    for piece in pieces[1:-1]:
        at = expanded.find(piece, pos + 1)  # at least one character of expansion before it
        if at < 0:
            return None
        left.append(at)
        pos = at + len(piece)
    if last < pos + 1:
        return None
    left.append(last)
    right, end = [last], last
    for piece in reversed(pieces[1:-1]):
        end = expanded.rfind(piece, 0, end - 1)
        right.append(end)
    right.append(0)
    right.reverse()
    out, t_start = [], 0
    for piece, a, b in zip(pieces, left, right):
        out.append((t_start, len(piece), a if a == b else None))
        t_start += len(piece) + len(marker or "")
    return out
