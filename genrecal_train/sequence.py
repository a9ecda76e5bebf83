"""Build Recalibrator sequences (docs/DESIGN.md, "Recalibrator sequence") from a teacher sample and the student's
features of the same conversation.

Per answer segment k with n_k teacher answer tokens: the question slots (student features of every student
token since the previous answer; or, on the regularizer path, the teacher's own features there), then n_k - 1
answer slots. The scored slots are the last question slot and the answer slots, in the order of the teacher's
label positions, so slot j of segment k predicts the teacher's target j of that segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genrecal_cache.store.reader import TeacherSample

from .recalibrator import AnswerInputs, RecalBatch


@dataclass
class SlotSample:
    """One sample's slots per answer segment: `question[k]` (q_k, D) and `answers[k]` (n_k - 1, D_l).

    Question slots are student features (D_s) unless `teacher_question` (the regularizer path: teacher
    features (D_l), which go through ProjPre like the answer slots)."""

    question: list[torch.Tensor]
    answers: list[torch.Tensor]
    teacher_question: bool = False

    @property
    def length(self) -> int:
        return sum(len(q) + len(a) for q, a in zip(self.question, self.answers))


def answer_spans(segments: list) -> list[tuple[int, int, int]]:
    """(question_start, answer_start, end) of every assistant turn: the question runs from the previous
    answer's end (or 0) to this answer's start. `segments`: chat.Segment objects or their dicts (as stored)."""
    out, prev_end = [], 0
    for s in segments:
        s = s.to_dict() if hasattr(s, "to_dict") else s
        if s["role"] == "assistant":
            if s["answer_start"] <= prev_end:
                raise ValueError(f"assistant turn {s['turn']} has no question tokens before it "
                                 "(two answers in a row); such samples cannot be recalibrated")
            out.append((prev_end, s["answer_start"], s["end"]))
            prev_end = s["end"]
    return out


def teacher_answer_inputs(sample: TeacherSample, mode: AnswerInputs | str, embed: torch.Tensor | None
                          ) -> list[torch.Tensor]:
    """Per segment, the inputs of its n_k - 1 answer slots, in storage dtype (ProjPre converts them).

    "features": the teacher's final features at label positions 1..n_k-1 of the segment (the paper).
    "embeddings": the teacher's input embeddings of answer tokens 0..n_k-2, i.e. E[targets[0..n_k-2]]."""
    mode = AnswerInputs(mode)
    out, a = [], 0
    for _, start, end in answer_spans(sample.segments):
        n = end - start
        if mode == AnswerInputs.features:
            out.append(sample.features[a + 1 : a + n])  # (n-1, D_l)
        else:
            assert embed is not None, "answer inputs 'embeddings' need the teacher's embedding table"
            out.append(embed[sample.targets[a : a + n - 1]])  # (n-1, D_l)
        a += n
    assert a == len(sample.targets), "segments and label positions disagree"
    return out


def teacher_question_inputs(sample: TeacherSample) -> list[torch.Tensor]:
    """Per segment, the teacher's own features at its question positions (the regularizer path).

    The last question position is a label position, so its feature comes from `features`; the others from
    `question_features`. Needs a store written with --question-features."""
    if sample.question_features is None:
        raise ValueError("the regularizer needs question features: write the store with --question-features")
    mask = sample.label_mask
    full = sample.features.new_empty(len(mask), sample.features.shape[1])  # (L, D_l)
    full[mask] = sample.features
    full[~mask] = sample.question_features
    return [full[q0:a0] for q0, a0, _ in answer_spans(sample.segments)]


def student_question_inputs(features: torch.Tensor, segments: list) -> list[torch.Tensor]:
    """Per segment, the student's final features (L_s, D_s) at its question positions."""
    return [features[q0:a0] for q0, a0, _ in answer_spans(segments)]


def build_batch(samples: list[SlotSample], student_hidden: int, device: torch.device | str,
                dtype: torch.dtype) -> RecalBatch:
    """Lay the samples' slots out as a right-padded (B, L) batch of Recalibrator inputs."""
    lengths = [s.length for s in samples]
    b, L = len(samples), max(lengths)
    student = torch.zeros(b * L, student_hidden, device=device, dtype=dtype)
    teacher_inputs, answer_index, scored_index = [], [], []
    student_rows, student_index = [], []
    for i, s in enumerate(samples):
        pos = i * L
        for q, a in zip(s.question, s.answers):
            q_idx = torch.arange(pos, pos + len(q))
            a_idx = torch.arange(pos + len(q), pos + len(q) + len(a))
            if s.teacher_question:
                teacher_inputs.append(q)
                answer_index.append(q_idx)
            else:
                student_rows.append(q)
                student_index.append(q_idx)
            teacher_inputs.append(a)
            answer_index.append(a_idx)
            scored_index += [torch.tensor([pos + len(q) - 1]), a_idx]
            pos += len(q) + len(a)
    if student_rows:  # index_put keeps the student's autograd graph
        student = student.index_put((torch.cat(student_index).to(device),), torch.cat(student_rows).to(dtype))
    cat = lambda xs: torch.cat(xs).to(device) if xs else torch.zeros(0, dtype=torch.long, device=device)  # noqa: E731
    return RecalBatch(
        student=student.view(b, L, student_hidden),
        teacher_inputs=torch.cat(teacher_inputs).to(device) if teacher_inputs else torch.zeros(0, 1, device=device),
        answer_index=cat(answer_index),
        scored_index=cat(scored_index),
        lengths=torch.tensor(lengths, device=device),
    )
