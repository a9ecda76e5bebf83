"""--feature-dtype fp8: features as float8 e4m3 bits with one float32 scale per token row, against a float64
reference; every reader gets them dequantised; fixed at creation; NaN/inf still refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from genrecal_cache.job.config import CacheConfig
from genrecal_cache.job.launch import run_cache
from genrecal_cache.store.dtypes import FP8, decode_features, encode_features, stored_features
from genrecal_cache.store.reader import TeacherStore
from genrecal_cache.store.record import non_finite
from tests.helpers import run_command

ENV = {"OMP_NUM_THREADS": "1"}
E4M3_REL = 2.0**-4  # half an ulp of e4m3's 3 mantissa bits, relative, for normal values
E4M3_SUB = 2.0**-10  # half its smallest subnormal step (2^-9), in units of the row's scale


def _rows(d: int = 3584, n: int = 64, outliers: int = 4, seed: int = 0) -> torch.Tensor:
    """Activation-like rows: Gaussian, plus a few channels 100x the median magnitude (as real LLMs have)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:, torch.randperm(d, generator=g)[:outliers]] *= 100 / x.abs().median()
    return x


def test_each_row_is_scaled_into_e4m3s_range_and_comes_back_within_half_an_ulp():
    x = _rows()  # float64: the reference
    bits, scale = encode_features(x.float(), FP8)
    assert bits.dtype == np.uint8 and bits.shape == tuple(x.shape) and scale.shape == (len(x),)
    assert np.allclose(scale, x.abs().amax(1).numpy() / 448.0, rtol=1e-6)
    back = decode_features(bits, scale, FP8).double()
    assert back.dtype == torch.float64 and torch.isfinite(back).all()
    err = (back - x).abs()
    bound = torch.maximum(E4M3_REL * x.abs(), E4M3_SUB * torch.from_numpy(scale).double()[:, None]) * 1.001
    assert (err <= bound).all(), float((err / bound).max())
    assert torch.allclose(back.abs().amax(1), x.abs().amax(1), rtol=1e-6)  # a row's largest value: e4m3's 448


def test_zero_rows_empty_rows_and_non_finite_values():
    bits, scale = encode_features(torch.zeros(3, 8), FP8)
    assert (scale == 1).all() and (decode_features(bits, scale, FP8) == 0).all()
    bits, scale = encode_features(torch.zeros(0, 8), FP8)
    assert bits.shape == (0, 8) and scale.shape == (0,)
    for bad in (float("nan"), float("inf")):
        x = torch.ones(4, 8)
        x[2, 5] = bad
        bits, scale = encode_features(x, FP8)
        found = non_finite({"features": bits, "features_scale": scale})
        assert found is not None and "at label positions [2]" in found, found
    assert non_finite(dict(zip(("features", "features_scale"), encode_features(torch.ones(4, 8), FP8)))) is None


@pytest.fixture(scope="module")
def stores(zoo, demo_manifest, tmp_path_factory) -> dict[str, Path]:
    """The same job (float32 compute) stored as fp8, bf16 and fp32, with question features and a layer: written in
    this process (the stores are this file's data; the CLI's --feature-dtype is run by the tests below)."""
    root = tmp_path_factory.mktemp("fp8")
    out = {}
    for name, fd in (("fp8", "fp8"), ("bf16", "bfloat16"), ("fp32", "auto")):
        out[name] = root / name
        res = run_cache(CacheConfig(teacher=str(zoo["llava"]), manifest=demo_manifest, output=out[name],
                                    feature_dtype=fd, question_features=True, layers="1", dtype="float32",
                                    device="cpu", progress=False, render_workers=0, command=["test"]))
        assert res.samples > 0, res.top_reasons(5)
    return out


def _samples(path: Path) -> list:
    store = TeacherStore(path)
    return [s for p in store.parts for s in p.read(0, len(p))]


def test_readers_get_the_fp32_stores_features_through_fp8(stores):
    fp8, fp32 = _samples(stores["fp8"]), _samples(stores["fp32"])
    assert [s.sample_id for s in fp8] == [s.sample_id for s in fp32]
    for a, b in zip(fp8, fp32):
        assert a.features.dtype == torch.float32
        for got, ref in ((a.features, b.features), (a.question_features, b.question_features),
                         (a.layers[1], b.layers[1])):
            assert torch.equal(got, stored_features(ref, FP8))  # exactly the fp8 rounding of the fp32 values
        assert torch.equal(a.targets, b.targets) and torch.equal(a.token_ids, b.token_ids)
    assert TeacherStore(stores["fp8"]).feature_dtype == torch.float32


def test_the_fp8_store_verifies_and_takes_little_more_than_half_the_bf16_features_bytes(stores):
    done = run_command("inspect-cache", "--store", stores["fp8"], "--verify", "--json", env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["verify"]["ok"] and out["summary"]["feature_dtype"] == FP8
    bf16 = json.loads(run_command("inspect-cache", "--store", stores["bf16"], "--json", env=ENV,
                                  timeout=300).stdout)["summary"]

    def feature_bytes(s: dict) -> int:
        return sum(b["bytes_on_disk"] for p in s["parts"] for name, b in p["arrays"].items()
                   if name.split("_scale")[0] in ("features", "question_features", "layers/1"))

    ratio = feature_bytes(out["summary"]) / feature_bytes(bf16)
    assert ratio <= 0.6, ratio  # D = 64 here: the scale is 4 B per 64 values (at D = 3584, 4 B per 3584)
    text = run_command("inspect-cache", "--store", stores["fp8"], env=ENV, timeout=300).stdout
    assert "fp8 (float8_e4m3fn, a float32 scale per row)" in text


def test_another_feature_dtype_on_resume_is_refused_naming_the_option(zoo, demo_manifest, stores):
    done = run_command("cache-teacher", "--teacher", zoo["llava"], "--manifest", demo_manifest, "--output",
                       stores["fp8"], "--feature-dtype", "bf16", "--question-features", "--layers", "1", "--dtype",
                       "float32", "--device", "cpu", "--no-progress", "--render-workers", "0", env=ENV, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "written with --feature-dtype fp8, this run asks for bfloat16" in done.stderr, done.stderr[-2000:]
    bad = run_command("cache-teacher", "--teacher", zoo["llava"], "--manifest", demo_manifest, "--output",
                      stores["fp8"].parent / "never", "--feature-dtype", "int4", env=ENV, timeout=300)
    assert bad.returncode == 2 and "--feature-dtype must be one of" in bad.stderr, bad.stderr[-2000:]


def test_train_student_from_an_fp8_store(stores, zoo, tmp_path):
    done = run_command("train-student", "--store", stores["fp8"], "--student", zoo["idefics3"], "--output",
                       tmp_path / "run", "--stage", "1", "--max-steps", "2", "--batch-size", "4", "--device", "cpu",
                       "--no-progress", "--reliance-every", "0", "--eval-every", "0", "--log-every", "1", env=ENV,
                       timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "run" / "stage1" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(np.isfinite(r["reg"]) and r["reg"] > 0 for r in steps)
