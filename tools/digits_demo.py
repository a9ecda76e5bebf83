"""The demo: GenRecal on digits VQA, end to end on a CPU. Makes the data and a teacher, caches the teacher,
trains a smaller student of another architecture and tokenizer three ways, evaluates, prints a table:

  student untrained | SFT on 100 gold labels | SFT on the teacher's answers (the fair baseline) |
  GenRecal on the teacher's answers (stages 1-3) | the teacher itself

Every step prints its command line. Run: python tools/digits_demo.py demo-out  (what `make demo` does).
tools/experiment.py repeats the comparison over seeds, sizes, arms and controls with the functions here.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits_vqa import write_digits  # noqa: E402
from tiny_zoo import build_model  # noqa: E402
from train_teacher import train_sft  # noqa: E402

from genrecal_cache.core.config import config_from, read_config, to_argv  # noqa: E402
from genrecal_cache.job.config import CacheConfig
from genrecal_cache.job.launch import run_cache  # noqa: E402
from genrecal_cache.store.reader import TeacherStore  # noqa: E402
from genrecal_train.config import TrainConfig  # noqa: E402
from genrecal_train.evaluate import EvalConfig, evaluate  # noqa: E402
from genrecal_train.trainer import train  # noqa: E402

TEACHER_EPOCHS = 8


@dataclass
class Arm:
    """How one student is trained: `method` sft (stage 3 only), genrecal (stages 1-3) or uld (stages 2-3), on
    which store, with which flags.
    Stores: "gold" (the gold rows, teacher-forced on their answers), "teacher" (the training images answered by
    the teacher), "random" (the same answers, teacher-forced through an untrained teacher: the control)."""

    name: str
    store: str
    method: str
    flags: dict[str, Any] = field(default_factory=dict)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "demo"


def _show(tool: str, cfg: Any) -> None:
    """The command line that runs `cfg`: its config file, and the options the demo sets over it."""
    config = EXAMPLES / f"{tool}.yaml"
    in_file = read_config(config, type(cfg))
    argv = to_argv(cfg, skip=("command", "progress", *in_file), changed_only=True)
    print(f"$ {tool} --config {config.relative_to(EXAMPLES.parents[1])} " + " ".join(argv), flush=True)


def make_data(work: Path, gold: int, seed: int = 0, noise: float = 0.0, rotate: float = 0.0) -> dict[str, Path]:
    d = work / "data"
    if not (d / "train.jsonl").exists():
        print(f"$ python tools/digits_vqa.py {d} --gold {gold} --seed {seed} --noise {noise} --rotate {rotate}",
              flush=True)
        write_digits(d, gold=gold, seed=seed, noise=noise, rotate=rotate)
    return {k: d / f"{k}.jsonl" for k in ("heldout", "gold", "pool", "train")}


def make_teacher(work: Path, data: dict[str, Path], kind: str = "trained", seed: int = 0) -> tuple[Path, float]:
    """A tiny LLaVA trained on every training image's answer ("trained"), or left random ("random"), and its
    held-out accuracy; made once."""
    out = work / "teachers" / kind
    done = out / "heldout.json"
    if not done.exists():
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        build_model("llava", out, seed=seed, scale=2)
        if kind == "trained":
            print(f"$ python tools/train_teacher.py --manifest {data['train']} --heldout {data['heldout']} "
                  f"--out {out} --epochs {TEACHER_EPOCHS}", flush=True)
            train_sft(out, data["train"], TEACHER_EPOCHS, 1e-3, 16, seed, progress=False)
        acc = accuracy(out, data["heldout"])
        done.write_text(json.dumps({"accuracy": acc, "seconds": time.perf_counter() - t0}))
    return out, json.loads(done.read_text())["accuracy"]


def make_store(work: Path, name: str, teacher: Path, manifest: Path, answers: str, rows: int | None = None,
               backend: str = "hf", render_workers: int | None = None, **options: Any) -> Path:
    """A teacher store of the first `rows` rows of `manifest` (with question features for the regularizer);
    `render_workers=0` where the caller is itself a pool's worker (which may not start processes); `options`:
    other cache-teacher options."""
    out = work / "stores" / name
    if not (out / "DONE").exists():
        shutil.rmtree(out, ignore_errors=True)
        cfg = config_from(CacheConfig, EXAMPLES / "cache-teacher.yaml", teacher=str(teacher), manifest=manifest,
                          output=out, max_samples=rows, answers=answers, backend=backend, progress=False,
                          render_workers=render_workers, command=["demo"], **options)
        _show("cache-teacher", cfg)
        res = run_cache(cfg)
        if res.rejects:
            print(f"  {res.rejects} rows rejected (inspect-cache --store {out} shows why)")
        (out / "DONE").touch()
    return out


def export_manifest(store: Path, out: Path) -> Path:
    """The store's conversations (with the answers it was forced on) as a manifest, images inline."""
    if not out.exists():
        s = TeacherStore(store)
        with out.open("w") as f:
            for i in range(len(s)):
                t = s[i]
                f.write(json.dumps({"id": t.sample_id, "messages": t.messages,
                                    "images": [base64.b64encode(b).decode() for b in t.images]}) + "\n")
    return out


def train_student(work: Path, store: Path, arm: Arm, seed: int, steps: int, tag: str) -> Path:
    """The student (a tiny Idefics3: another tokenizer and image layout) trained as `arm` says, `steps` optimizer
    steps per stage (SFT: twice that in stage 3, as many student steps as GenRecal's stages 2 and 3)."""
    out = work / "runs" / re.sub(r"[^A-Za-z0-9_.-]+", "-", tag)
    final = out / "stage3" / "final" / "student"  # SFT runs stage 3 only; GenRecal ends with it
    if final.exists():
        return final
    shutil.rmtree(out, ignore_errors=True)
    base = student_base(work, seed)
    sft = arm.method == "sft"  # one stage: as many student steps as the others' stages 2 and 3
    cfg = config_from(TrainConfig, EXAMPLES / "train-student.yaml", store=store, student=str(base), output=out,
                      method=arm.method, max_steps=2 * steps if sft else steps, seed=seed, progress=False,
                      command=["demo"], **arm.flags)
    _show("train-student", cfg)
    train(cfg)
    return final


def student_base(work: Path, seed: int) -> Path:
    base = work / "students" / f"idefics3-seed{seed}"
    if not (base / "config.json").exists():
        build_model("idefics3", base, seed=seed, scale=1)
    return base


def accuracy(model: Path, heldout: Path) -> float:
    res = evaluate(EvalConfig(student=str(model), manifest=heldout, max_new_tokens=4, device="cpu", progress=False,
                              command=["demo"]))
    return res["normalised_match"]


def reliance(final: Path) -> dict[str, float]:
    """The student-reliance check at the end of stages 1 and 2: first-answer-token accuracy of the Recalibrator
    with each sample's own student features and with another sample's."""
    out = {}
    for stage in (1, 2):
        log = final.parents[2] / f"stage{stage}" / "metrics.jsonl"
        recs = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
        recs = [r for r in recs if "reliance_own_acc" in r]
        if recs:
            out[f"s{stage}_own"], out[f"s{stage}_shuffled"] = recs[-1]["reliance_own_acc"], recs[-1][
                "reliance_shuffled_acc"]
    return out


def validation_accuracy(run: Path) -> dict[int, float]:
    """Each stage's last validation accuracy in a train-student output: the normalised match of the student's greedy
    answers on the store's held-out samples (`val_normalised_match` in stage<k>/metrics.jsonl). Stages that do not
    train the student (stage 1) give none."""
    out = {}
    for log in sorted(run.glob("stage[0-9]/metrics.jsonl")):
        accs = [r["val_normalised_match"] for r in map(json.loads, log.read_text().splitlines())
                if "val_normalised_match" in r]
        if accs:
            out[int(log.parent.name.removeprefix("stage"))] = accs[-1]
    return out


def validation_summary(run: Path) -> str:
    """`validation_accuracy` as the demo prints it: "stage 2 41.0%, stage 3 55.0%"."""
    accs = validation_accuracy(run)
    return ", ".join(f"stage {k} {v:.1%}" for k, v in accs.items()) or "none logged"


DEMO_ARMS = [Arm("SFT on the gold labels", "gold", "sft"), Arm("SFT on the teacher's answers", "teacher", "sft"),
             Arm("GenRecal on the teacher's answers", "teacher", "genrecal")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--gold", type=int, default=100, help="training images that keep their gold answers")
    ap.add_argument("--steps", type=int, default=250, help="student optimizer steps per stage")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    data = make_data(args.out, args.gold)
    teacher, teacher_acc = make_teacher(args.out, data)
    print(f"teacher (tiny LLaVA, trained on all training images) held-out accuracy: {teacher_acc:.1%}", flush=True)
    backend = "vllm" if importlib.util.find_spec("vllm") else "hf"  # `make test` installs vLLM's CPU build
    stores = {"gold": make_store(args.out, "gold", teacher, data["gold"], "dataset", backend=backend),
              "teacher": make_store(args.out, "teacher", teacher, data["train"], "generate", backend=backend)}
    rows = [("student, untrained", accuracy(student_base(args.out, args.seed), data["heldout"]))]
    for arm in DEMO_ARMS:
        final = train_student(args.out, stores[arm.store], arm, args.seed, args.steps, f"demo-{arm.name}")
        rows.append((arm.name, accuracy(final, data["heldout"])))
        print(f"  {arm.name}: validation accuracy at the end of each stage (on the store's held-out samples): "
              f"{validation_summary(final.parents[2])}", flush=True)
    rows.append(("the teacher (reference)", teacher_acc))
    n_pool = sum(1 for _ in data["pool"].open())
    print(f"\ndigits VQA: {sum(1 for _ in data['heldout'].open())} held-out images; the student (tiny Idefics3, "
          f"another tokenizer) has {args.gold} gold labels, or the teacher's answers for all "
          f"{args.gold + n_pool} training images")
    for name, acc in rows:
        print(f"  {name:36} {acc:6.1%}")
    print(f"({time.perf_counter() - t0:.0f} s; tools/experiment.py measures the difference over seeds and controls)")


if __name__ == "__main__":
    main()
