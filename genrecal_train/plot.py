"""Pictures of a run: loss curves per stage, and the paper's feature-space picture: t-SNE of the student's
features, their recalibrated version, the teacher's features and the teacher's recalibrated features.

The features are those of the first answer token's slot (the student's last question position) of held-out
samples, coloured by the teacher's target token: after stage 1, the recalibrated student features should sit
with the teacher's features of the same answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from genrecal_cache.core.errors import ConfigError
from genrecal_cache.core.models import load_model
from genrecal_cache.data.render import Renderer
from genrecal_cache.store.format import TOKENIZER_DIR
from genrecal_cache.store.reader import TeacherStore

from .data import is_heldout, pairs
from .models import find_recalibrator
from .recalibrator import AnswerInputs, Recalibrator
from .sequence import SlotSample, build_batch, student_question_inputs, teacher_answer_inputs, teacher_question_inputs

LOSS_KEYS = ("loss", "ar", "kl", "reg", "student")


def loss_curves(run: Path, out: Path) -> Path:
    """One panel per stage of `run` (a train-student output directory): every logged loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = sorted(Path(run).glob("stage*/metrics.jsonl"))
    if not logs:
        raise ConfigError(f"{run}: no stage*/metrics.jsonl (pass a train-student --output directory)")
    fig, axes = plt.subplots(1, len(logs), figsize=(4.5 * len(logs), 3.4), squeeze=False)
    for ax, log in zip(axes[0], logs):
        recs = [r for r in map(json.loads, log.read_text().splitlines()) if "loss" in r]
        for k in LOSS_KEYS:
            pts = [(r["step"], r[k]) for r in recs if k in r]
            if pts:
                ax.plot(*zip(*pts), label=k, lw=1.2)
        ax.set_title(log.parent.name)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("loss per label token")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


@torch.no_grad()
def feature_points(store: TeacherStore, student_dir: str, recal: Recalibrator, limit: int = 300,
                   heldout_fraction: float = 0.05) -> dict[str, np.ndarray]:
    """For up to `limit` held-out samples (all samples when none are held out): `student` (n, D_s),
    `recal_student`, `teacher`, `recal_teacher` (n, D_l) and `target` (n,) at the first answer token's slot."""
    loaded = load_model(student_dir, flag="--student")  # a VLM or a text-only student alike
    student, renderer = loaded.model.eval(), Renderer(loaded.processor)
    embed = store.head("embed") if recal.cfg.answer_inputs == AnswerInputs.embeddings else None
    pts = pairs(store, renderer, lambda sid: is_heldout(sid, heldout_fraction), limit)  # held out first
    if len(pts) < min(limit, 20):  # too few held out: any others
        seen = {s.teacher.sample_id for s in pts}
        pts += pairs(store, renderer, lambda sid: sid not in seen, limit - len(pts))
    out: dict[str, list] = {"student": [], "recal_student": [], "teacher": [], "recal_teacher": [], "target": []}
    for s in pts:
        r = s.student
        hidden = student.base_model(**r.inputs, use_cache=False).last_hidden_state[0]  # (L, D_s)
        q = student_question_inputs(hidden, r.segments)[:1]  # the first answer's question slots
        answer = [teacher_answer_inputs(s.teacher, recal.cfg.answer_inputs, embed)[0]]
        rs = recal(build_batch([SlotSample(q, answer)], hidden.shape[-1], "cpu", torch.float32))[0]
        reg = SlotSample(teacher_question_inputs(s.teacher)[:1], answer, teacher_question=True)
        rt = recal(build_batch([reg], hidden.shape[-1], "cpu", torch.float32))[0]
        out["student"].append(q[0][-1].numpy())
        out["recal_student"].append(rs.numpy())
        out["teacher"].append(s.teacher.features[0].float().numpy())
        out["recal_teacher"].append(rt.numpy())
        out["target"].append(int(s.teacher.targets[0]))
    return {k: np.stack(v) for k, v in out.items()}


def feature_picture(store: TeacherStore, student_dir: str, recalibrators: dict[str, Recalibrator], out: Path,
                    limit: int = 300) -> Path:
    """One row per Recalibrator (e.g. the start and the end of stage 1): the student's features alone (left),
    and the teacher's features with both recalibrated sets in one t-SNE (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(store.tokenizer_dir() or store.location.join(TOKENIZER_DIR)))
    fig, axes = plt.subplots(len(recalibrators), 2, figsize=(11, 4.6 * len(recalibrators)), squeeze=False)
    for row, (title, recal) in zip(axes, recalibrators.items()):
        pts = feature_points(store, student_dir, recal, limit)
        n = len(pts["target"])
        ids = sorted(set(pts["target"].tolist()))
        colors = {t: plt.cm.tab10(i % 10) for i, t in enumerate(ids)}
        perplexity = max(2, min(30, (n - 1) // 3))
        s2 = TSNE(2, perplexity=perplexity, init="pca", random_state=0).fit_transform(pts["student"])
        joint = np.concatenate([pts["teacher"], pts["recal_student"], pts["recal_teacher"]])
        j2 = TSNE(2, perplexity=perplexity, init="pca", random_state=0).fit_transform(joint)
        c = [colors[t] for t in pts["target"]]
        row[0].scatter(s2[:, 0], s2[:, 1], c=c, s=12)
        row[0].set_title(f"{title}: student features")
        for k, (name, marker) in enumerate([("teacher", "o"), ("recalibrated student", "x"),
                                            ("recalibrated teacher", "+")]):
            part = j2[k * n : (k + 1) * n]
            row[1].scatter(part[:, 0], part[:, 1], c=c, s=14, marker=marker, label=name,
                           alpha=0.9 if marker != "o" else 0.35)
        row[1].set_title(f"{title}: teacher space")
        row[1].legend(fontsize=8, loc="best")
    handles = [plt.Line2D([], [], ls="", marker="o", color=colors[t], label=tok.decode([t]).strip() or str(t))
               for t in ids[:10]]
    fig.legend(handles=handles, loc="lower center", ncol=min(10, len(handles)), fontsize=8,
               title="first answer token (teacher)")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def inspect_plot(store: TeacherStore, student_dir: str, recalibrators: list[str], out: Path, limit: int) -> Path:
    """`inspect-cache --plot` (reached through the `genrecal.inspect_plot` entry point): one row per
    Recalibrator, given as a stage folder (run/stage1/final) or its recalibrator/ subfolder."""
    found = [find_recalibrator(r) for r in recalibrators]
    return feature_picture(store, student_dir, {(p.parent.name if p.name == "recalibrator" else p.name): Recalibrator.load(p) for p in found}, out, limit)
