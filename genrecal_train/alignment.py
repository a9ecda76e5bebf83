"""Which student answer position is compared with which teacher answer position when the two tokenizations
differ (the ULD baseline): by answer-token index, truncated to the shorter answer (as ULD does), or by the
character offsets of the answer text.
"""

from __future__ import annotations

import bisect
from typing import Any

from .data import TrainSample
from .sequence import answer_spans


def answer_pairs(sample: TrainSample, by: str, student_tok: Any = None, teacher_tok: Any = None
                 ) -> tuple[list[int], list[int]]:
    """(student label positions, teacher label rows) compared pairwise, answer segment by answer segment.

    A student label position p predicts token p+1 (an answer token); a teacher label row indexes the stored
    features/targets/top-k. `by` is "index" (the j-th answer token of each side, up to the shorter) or "chars"
    (each student answer token with the teacher token that covers its first character; needs both tokenizers,
    and falls back to "index" for a segment whose texts do not match)."""
    positions: list[int] = []
    rows: list[int] = []
    s_ids, t_ids = sample.student.input_ids, sample.teacher.targets.tolist()
    a = 0
    for (_, s0, s1), (_, t0, t1) in zip(answer_spans(sample.student.segments), answer_spans(sample.teacher.segments)):
        n_t = t1 - t0
        pairs = None
        if by == "chars":
            pairs = _char_pairs([int(x) for x in s_ids[s0:s1]], t_ids[a : a + n_t], student_tok, teacher_tok)
        if pairs is None:
            pairs = [(j, j) for j in range(min(s1 - s0, n_t))]
        positions += [s0 - 1 + j for j, _ in pairs]
        rows += [a + i for _, i in pairs]
        a += n_t
    return positions, rows


def _char_pairs(s_ids: list[int], t_ids: list[int], s_tok: Any, t_tok: Any) -> list[tuple[int, int]] | None:
    """Content tokens paired by character offsets; what closes each answer (end of turn, and what the template
    writes after it) paired in order. None where the two sides' answer texts differ or cannot be re-tokenised as stored."""
    s_body, s_tail = _split_tail(s_ids, s_tok)
    t_body, t_tail = _split_tail(t_ids, t_tok)
    s_starts, t_starts = _starts(s_tok, s_body), _starts(t_tok, t_body)
    if s_starts is None or t_starts is None or s_starts[1] != t_starts[1] or not t_body:
        return None
    pairs = [(j, max(0, bisect.bisect_right(t_starts[0], c) - 1)) for j, c in enumerate(s_starts[0])]
    pairs += [(len(s_body) + k, len(t_body) + k) for k in range(min(len(s_tail), len(t_tail)))]
    return pairs


def _split_tail(ids: list[int], tok: Any) -> tuple[list[int], list[int]]:
    """An answer's text tokens, and what the template closes it with: its first special token (end of turn) and
    everything after it (e.g. a newline)."""
    special = set(tok.all_special_ids)
    n = next((i for i, t in enumerate(ids) if t in special), len(ids))
    return ids[:n], ids[n:]


def _starts(tok: Any, ids: list[int]) -> tuple[list[int], str] | None:
    """Each token's first character in the answer's text (leading spaces dropped), and that text."""
    text = tok.decode(ids)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    if enc["input_ids"] != ids:
        return None
    lead = len(text) - len(text.lstrip())
    return [max(0, start - lead) for start, _ in enc["offset_mapping"]], text.strip()
