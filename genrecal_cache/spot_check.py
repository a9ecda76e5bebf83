"""`inspect-cache --spot-check N --teacher PATH`: run the teacher again on N stored samples drawn at random (seeded)
and compare what it computes now with what the store holds, array by array, against tolerances set by the store's
feature dtype: a store written with another checkpoint, chat template or processor setting fails, named.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from genrecal_cache.core.config import config_from
from genrecal_cache.core.errors import ConfigError, RejectError
from genrecal_cache.data.render import Renderer
from genrecal_cache.data.rows import stored_sample
from genrecal_cache.store.dtypes import FP8, stored_features
from genrecal_cache.store.head import TeacherHead
from genrecal_cache.store.reader import TeacherStore
from genrecal_cache.store.sample import TeacherSample

# Per stored feature dtype: a feature row's max |Δ| relative to its largest value (a little over one unit in the
# last place of that value, since the store rounded the values it computed); the mean KL of the head's
# distributions (nats); a stored top-k log-probability's |Δ|.
TOLERANCES = {"float32": (1e-3, 1e-5, 1e-3), "float16": (4e-3, 1e-4, 2e-2), "bfloat16": (1.6e-2, 1e-3, 5e-2),
              FP8: (0.14, 2e-3, 0.1)}


@dataclass
class Check:
    """One array's comparison over the samples drawn: the largest errors, whether they are within tolerance, and
    the samples that are not."""

    name: str
    tolerance: float | None  # None: must be equal
    max_abs: float = 0.0
    max_rel: float = 0.0  # relative to each row's largest stored value (features), else as max_abs
    failed: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def ok(self) -> bool:
        return not self.failed

    def add(self, sample_id: str, abs_err: float, rel_err: float, bad: bool, note: str = "") -> None:
        self.max_abs, self.max_rel = max(self.max_abs, abs_err), max(self.max_rel, rel_err)
        if bad:
            self.failed.append(sample_id)
            self.note = self.note or note


@dataclass
class SpotReport:
    seed: int
    sample_ids: list[str]
    feature_dtype: str
    checks: dict[str, Check]
    kl_mean: float
    kl_max: float

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks.values())

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "seed": self.seed, "sample_ids": self.sample_ids, "feature_dtype": self.feature_dtype,
                "kl_mean": self.kl_mean, "kl_max": self.kl_max,
                "checks": {k: {**asdict(c), "ok": c.ok} for k, c in self.checks.items()}}


def job_config(store: TeacherStore, teacher: str, backend: str | None, device: str | None) -> Any:
    """The cache job's own options as its first part recorded them (`configs/<part>.yaml`), with this teacher
    (and backend and device, when given)."""
    from genrecal_cache.job.config import CacheConfig

    if store.remote:
        raise ConfigError("--spot-check reads the job's recorded options from a local store (so far): copy the store "
                          "here, or run it where the store is")
    recorded = sorted((store.path / "configs").glob("*.yaml"))
    if not recorded:
        raise ConfigError(f"{store.path}/configs holds no recorded cache-teacher options (a store written before "
                          "GenRecal recorded them): --spot-check cannot know how the job ran")
    options = {"teacher": teacher, "render_workers": 0, "progress": False, "command": ["spot-check"]}
    options.update({k: v for k, v in (("backend", backend), ("device", device)) if v is not None})
    return config_from(CacheConfig, recorded[0], **options)


def spot_check(store: TeacherStore, n: int, teacher: str, backend: str | None = None, device: str | None = None,
               seed: int = 0) -> SpotReport:
    """Run `teacher` on `n` of the store's samples (drawn with `seed`) as the job did, and compare."""
    from genrecal_cache.teacher.load import load_teacher

    cfg = job_config(store, teacher, backend, device)
    if not len(store):
        raise ConfigError(f"{store.path} has no committed samples to spot-check: run cache-teacher first")
    picked = sorted(random.Random(seed).sample(range(len(store)), min(n, len(store))))
    samples = [store[i] for i in picked]
    fd = store.meta["feature_dtype"]
    rel_tol, kl_tol, lp_tol = TOLERANCES[fd]
    checks = {name: Check(name, None) for name in ("token_ids", "label_mask", "targets")}
    features = ["features", *(["question_features"] if store.meta["question_features"] else []),
                *(f"layers/{k}" for k in store.meta.get("layers", []))]
    checks.update({name: Check(name, rel_tol) for name in features})
    if store.meta["topk"]:
        checks["topk_logprobs"] = Check("topk_logprobs", lp_tol)
    if cfg.generation is not None:
        checks["answer"] = Check("answer", None)
    checks["distribution"] = Check("distribution", kl_tol)
    head, kls, worst = store.teacher_head(), [], {}  # worst: each compared sample's largest token KL
    t = load_teacher(cfg.teacher_spec)
    try:
        renderer = t.renderer(cfg.max_length or None)
        for smp in tqdm(samples, desc="inspect-cache --spot-check", unit="sample", dynamic_ncols=True):
            if one := _check_one(t, renderer, cfg, smp, store, head, fd, checks):
                kls += one
                worst[smp.sample_id] = max(one)
    finally:
        t.close()
    kl = torch.tensor(kls or [float("inf")], dtype=torch.float64)
    dist = checks["distribution"]
    dist.max_abs = dist.max_rel = float(kl.mean())
    if not kls:
        dist.failed, dist.note = [s.sample_id for s in samples], "no token could be compared"
    elif kl.mean() > kl_tol:  # name the samples whose largest KL is the largest
        dist.failed, dist.note = sorted(worst, key=worst.__getitem__, reverse=True)[:3], "the teacher's distributions differ"
    return SpotReport(seed, [s.sample_id for s in samples], fd, checks, float(kl.mean()), float(kl.max()))


def _check_one(t: Any, renderer: Renderer, cfg: Any, smp: TeacherSample, store: TeacherStore, head: TeacherHead,
               fd: str, checks: dict[str, Check]) -> list[float]:
    """Compare one sample; returns its per-token KL(stored || now)."""
    sid = smp.sample_id
    try:
        sample = stored_sample(smp, store.path)
        if "answer" in checks and smp.answers_generated:
            _check_answer(t, renderer, cfg, smp, sample, checks["answer"])
        r = renderer.render(sample)
    except RejectError as e:
        for name in ("token_ids", "label_mask", "targets"):
            checks[name].add(sid, 0.0, 0.0, True, f"the teacher cannot render it now: {e.reason}")
        return []
    ids = torch.as_tensor(r.input_ids, dtype=torch.long)
    mask = torch.as_tensor(r.label_mask, dtype=torch.bool)
    targets = torch.as_tensor(r.targets, dtype=torch.long)
    differs = next(((name, why) for name, now, stored, why in (
        ("token_ids", ids, smp.token_ids, f"{len(ids)} tokens now, {len(smp.token_ids)} stored, not all equal: "
                                          "another chat template, tokenizer or processor setting"),
        ("label_mask", mask, smp.label_mask, "other label positions"),
        ("targets", targets, smp.targets, "other targets")) if now.shape != stored.shape or not torch.equal(now, stored)),
        None)
    if differs:  # the first that differs is named; the arrays after it are not comparable position by position
        name, why = differs
        checks[name].add(sid, 0.0, 0.0, True, why)
        for other in checks:
            if other not in (name, "answer", "distribution") and checks[other].tolerance is not None:
                checks[other].add(sid, float("inf"), float("inf"), True, f"not comparable: {name} differ")
        return []
    images = [[im.load() for im in sample.images]] if t.takes_images else [[]]
    out = t.forward(renderer, [r], smp.question_features is not None, images, cfg.layer_ids)[0]
    if isinstance(out, RejectError):
        checks["features"].add(sid, float("inf"), float("inf"), True, f"the teacher rejects it now: {out.reason}")
        return []
    now = {"features": out.features, "question_features": out.question, **{f"layers/{k}": v
                                                                          for k, v in out.layers.items()}}
    stored = {"features": smp.features, "question_features": smp.question_features,
              **{f"layers/{k}": v for k, v in smp.layers.items()}}
    for name in checks:
        if name in now and stored.get(name) is not None and now[name] is not None:
            _compare_rows(checks[name], sid, stored[name].float(), now[name].float())
    z_now = stored_features(out.features, fd)  # what the job would store now
    kl, lp_err = [], 0.0
    for (rows, after), (_, before) in zip(head.log_probs(z_now), head.log_probs(smp.features.float())):  # (n, V)
        kl.append((before.exp() * (before - after)).sum(-1))
        if "topk_logprobs" in checks:
            lp_err = max(lp_err, float((after.gather(1, smp.topk_ids[rows]) - smp.topk_logprobs[rows].double()).abs()
                                       .max()))
    if "topk_logprobs" in checks:
        checks["topk_logprobs"].add(sid, lp_err, lp_err, lp_err > checks["topk_logprobs"].tolerance,
                                    "stored top-k log-probabilities differ from the teacher's now")
    return torch.cat(kl).tolist() if kl else []


def _compare_rows(check: Check, sid: str, stored: torch.Tensor, now: torch.Tensor) -> None:
    """Max |Δ| and max |Δ| relative to each stored row's largest value."""
    if stored.shape != now.shape:
        check.add(sid, float("inf"), float("inf"), True, f"shape {tuple(now.shape)} now, {tuple(stored.shape)} stored")
        return
    if not stored.numel():
        return
    err = (stored - now).abs()
    scale = stored.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    rel = float((err / scale).max())
    check.add(sid, float(err.max()), rel, rel > check.tolerance or not torch.isfinite(now).all(),
              "the teacher computes other values now")


def _check_answer(t: Any, renderer: Renderer, cfg: Any, smp: TeacherSample, sample: Any, check: Check) -> None:
    """A generated answer: the teacher writes it again (the job's seed and settings) and must write the same text."""
    gen = cfg.generation
    prompt = renderer.render_prompt(sample)
    images = [[im.load() for im in sample.images]] if t.takes_images else [[]]
    g = t.generate(renderer, [prompt], images, gen, [gen.seed * 1_000_003 + smp.source_row])[0]
    if isinstance(g, RejectError):
        check.add(smp.sample_id, 0.0, 0.0, True, f"the teacher cannot answer it now: {g.reason}")
        return
    now = renderer.tokenizer.decode(g.token_ids, skip_special_tokens=False)
    content = smp.messages[-1]["content"]
    stored = content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
    check.add(smp.sample_id, 0.0, 0.0, now != stored, f"answer {stored[:40]!r} stored, {now[:40]!r} now")


def format_spot_check(r: SpotReport) -> str:
    lines = [f"spot-check: {'OK' if r.ok else 'FAILED'}  {len(r.sample_ids)} samples drawn with --seed {r.seed}: "
             f"{', '.join(r.sample_ids[:10])}{' ...' if len(r.sample_ids) > 10 else ''}; features stored as "
             f"{'fp8' if r.feature_dtype == FP8 else r.feature_dtype}",
             f"  {'array':<20} {'max |Δ|':>10} {'max rel':>10} {'tolerance':>10}  result"]
    for c in r.checks.values():
        tol = "equal" if c.tolerance is None else f"{c.tolerance:.2g}"
        what = "mean KL" if c.name == "distribution" else ""
        res = "ok" if c.ok else f"FAILED: {c.note} ({', '.join(c.failed[:5])}{' ...' if len(c.failed) > 5 else ''})"
        lines.append(f"  {c.name:<20} {c.max_abs:>10.3g} {c.max_rel:>10.3g} {tol:>10}  {res} {what}".rstrip())
    lines.append(f"  head distributions: KL(stored || now) mean {r.kl_mean:.3g}, max {r.kl_max:.3g} nats per token")
    return "\n".join(lines)
