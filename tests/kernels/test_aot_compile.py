"""Every Triton kernel compiled ahead of time for sm_80 and sm_90 in each launch configuration of kernels/aot.py,
on this machine, without a GPU; and that table checked against the kernels and the launches the launchers make.

Compiling runs in worker processes without TRITON_INTERPRET (conftest sets it without a GPU, and under it
@triton.jit builds interpreter functions that cannot be compiled), one per architecture, with a fresh Triton cache.
The default run compiles aot.DEFAULT_RUN; `pytest -m slow tests/kernels/test_aot_compile.py` compiles the rest.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

import genrecal_kernels
from genrecal_kernels import aot, dispatch, fused_linear_ce_kl, proj_post_ln, proj_pre

CONFIGS = list(aot.configurations())
PARAMS = [pytest.param(c.name, arch, id=f"{c.name}@sm{arch}", marks=() if c.default else pytest.mark.slow)
          for c in CONFIGS for arch in aot.ARCHS]
MISSING = aot.toolchain_missing()
needs_toolchain = pytest.mark.skipif(MISSING is not None, reason=f"cannot compile for CUDA here: {MISSING}")


class Compiled(NamedTuple):
    rows: dict[tuple[str, int], dict]  # (configuration, arch) -> the worker's result row
    cuda_initialized: dict[int, bool]  # arch -> whether the worker initialised CUDA
    stderr: dict[int, str]


@pytest.fixture(scope="module")
def compiled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    """The (configuration, arch) pairs this session selected from this module, compiled by `python -m
    genrecal_kernels.aot`: one worker per arch, in parallel."""
    wanted: dict[int, list[str]] = {}
    for item in request.session.items:  # after -m / -k deselection
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.module is request.module and "config" in params:
            wanted.setdefault(params["arch"], []).append(params["config"])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))  # really compile, every run
    procs = {arch: subprocess.Popen([sys.executable, "-m", "genrecal_kernels.aot", "--arch", str(arch), "--only",
                                     *names], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch, names in wanted.items()}
    rows, cuda, errs = {}, {}, {}
    for arch, p in procs.items():
        out, errs[arch] = p.communicate(timeout=900)
        assert p.returncode == 0, f"the compile worker for sm_{arch} failed (rc {p.returncode}):\n{errs[arch][-3000:]}"
        for line in out.splitlines():
            row = json.loads(line)
            if "cuda_initialized" in row:
                cuda[arch] = row["cuda_initialized"]
            else:
                rows[(row["name"], row["arch"])] = row
    return Compiled(rows, cuda, errs)


@needs_toolchain
@pytest.mark.parametrize(("config", "arch"), PARAMS)
def test_kernel_compiles_for_cuda(compiled: Compiled, config: str, arch: int):
    row = compiled.rows.get((config, arch))
    assert row is not None, f"no result for {config} on sm_{arch}; worker stderr:\n{compiled.stderr[arch][-3000:]}"
    assert row["ok"], (f"{config} does not compile for sm_{arch} (launched by {_config(config).sites}):"
                       f"\n{row['error']}\nFix the kernel, or the launcher / kernels/aot.py if the configuration is "
                       "not one the launcher makes")
    limit = aot.SMEM_LIMIT[arch]
    assert row["shared"] <= limit, (f"{config} needs {row['shared']} B of shared memory, sm_{arch} has {limit}: it "
                                    "would fail to launch; choose smaller blocks (or fewer stages) in its launcher")


@needs_toolchain
def test_compiling_does_not_initialise_cuda(compiled: Compiled):
    assert compiled.cuda_initialized, "the fixture ran no worker"
    assert not any(compiled.cuda_initialized.values()), f"a worker initialised CUDA: {compiled.cuda_initialized}"


def _config(name: str) -> aot.Config:
    return next(c for c in CONFIGS if c.name == name)


def test_default_run_names_exist_and_cover_every_kernel():
    names = {c.name for c in CONFIGS}
    assert set(aot.DEFAULT_RUN) <= names, f"DEFAULT_RUN names unknown configurations: {set(aot.DEFAULT_RUN) - names}"
    assert {c.kernel for c in CONFIGS if c.default} == {c.kernel for c in CONFIGS}, "a kernel has no default config"
    assert len(names) == len(CONFIGS), "two configurations share a name"


def _jit_objects() -> dict[str, Any]:
    """Every @triton.jit object in the package, as "module:name"."""
    found = {}
    for info in pkgutil.iter_modules([str(Path(genrecal_kernels.__file__).parent)]):
        mod = importlib.import_module(f"genrecal_kernels.{info.name}")
        for attr, value in vars(mod).items():
            if type(value).__name__ in ("JITFunction", "InterpretedFunction"):
                found[f"{info.name}:{attr}"] = value
    return found


@pytest.mark.skipif(not dispatch.HAS_TRITON, reason="triton is not installed: there are no Triton kernels")
def test_table_matches_every_kernel_signature():
    """A new @triton.jit kernel, or a kernel parameter added or renamed, fails here until kernels/aot.py has it."""
    device_functions = {"fused_linear_ce_kl:_tanh", "fused_linear_ce_kl:_activate", "recal_proj:_load_as_f32"}
    kernels = set(_jit_objects()) - device_functions
    assert kernels == {c.kernel for c in CONFIGS}, (
        f"@triton.jit kernels without configurations in kernels/aot.py: {kernels - {c.kernel for c in CONFIGS}} "
        f"(or device functions to add to this test's list); configurations of no kernel: "
        f"{ {c.kernel for c in CONFIGS} - kernels}")
    for c in CONFIGS:
        aot.check(c)


def _record_launches(run) -> list[tuple]:
    """Launch keys (aot.launch_key) of every Triton kernel launch `run()` makes, seen through the kernels' own
    pre-run hooks (called with the launch arguments, natively and under the interpreter)."""
    seen: list[tuple] = []
    hooks = []
    for name, fn in _jit_objects().items():
        if name in {c.kernel for c in CONFIGS}:
            params = list(inspect.signature(fn.fn).parameters)

            def hook(*args, _name=name, _params=params, **kwargs):
                values = dict(zip(_params, args)) | {k: v for k, v in kwargs.items() if k in _params}
                options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
                seen.append(aot.launch_key(_name, values, options, full=not dispatch.INTERPRET))

            fn.add_pre_run_hook(hook)
            hooks.append((fn, hook))
    try:
        run()
    finally:
        for fn, hook in hooks:
            fn.pre_run_hooks.remove(hook)
    return seen


def _every_launch() -> None:
    """The public ops with impl="triton" over the inputs they take: dtypes, bias or not, softcap or not. Sizes map
    onto the table's blocks (V = 1000: BLOCK_V 1024; D_l = 96: BLOCK 128)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    n, d_s, d_l, v = 5, 40, 96, 1000

    def rand(*shape: int, dtype: torch.dtype = torch.float32, grad: bool = False) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dev, dtype).requires_grad_(grad)

    for p in aot.PARAMS:
        for softcap in (None, 30.0):
            for bias in (None, rand(v, dtype=p)):
                out = fused_linear_ce_kl(rand(n, d_s, dtype=p, grad=True), rand(n, d_s, dtype=p), rand(v, d_s, dtype=p),
                                         torch.randint(0, v, (n,), generator=g).to(dev), bias=bias, softcap=softcap,
                                         impl="triton")
                out.loss.backward()
        for has_bias in (True, False):
            for f in aot.FEATURES:
                x = rand(n, d_l, dtype=torch.bfloat16 if f == torch.uint16 else f)
                x = x.view(torch.uint16) if f == torch.uint16 else x
                b = rand(d_s, dtype=p, grad=True) if has_bias else None
                proj_pre(x, rand(d_s, d_l, dtype=p, grad=True), b, impl="triton").float().sum().backward()
            b = rand(d_l, dtype=p, grad=True) if has_bias else None
            y = proj_post_ln(rand(n, d_s, dtype=p, grad=True), rand(d_l, d_s, dtype=p, grad=True), b,
                             rand(d_l, dtype=p, grad=True), rand(d_l, dtype=p, grad=True), impl="triton")
            y.float().sum().backward()


@pytest.mark.skipif(not dispatch.HAS_TRITON or not (dispatch.INTERPRET or torch.cuda.is_available()),
                    reason="needs triton, and a GPU or TRITON_INTERPRET=1 to launch the kernels")
def test_table_matches_every_launch():
    """Every launch the launchers make is a configuration of the table, and every dtype / flag combination of the
    table is one they make. Under the interpreter (CPU) the device-chosen constexprs (aot.DEVICE_CHOSEN: matmul
    blocks, bf16 dot) and num_warps are not compared; on a GPU everything is."""
    full = not dispatch.INTERPRET
    launches = set(_record_launches(_every_launch))
    table = {c.key(full) for c in CONFIGS}
    missing = launches - table
    assert not missing, "launches with no configuration in kernels/aot.py (add them to its table):\n" + "\n".join(
        map(str, sorted(missing, key=str)))

    def kinds(keys: set[tuple]) -> set[tuple]:  # without what the problem size picks: BLOCK_V, BLOCK, num_warps
        return {(k, ptrs, tuple(f for f in flags if f[0] not in ("BLOCK_V", "BLOCK"))) for k, ptrs, flags, _ in keys}

    extra = kinds(table) - kinds(launches)
    assert not extra, "configurations in kernels/aot.py no launcher makes (remove them):\n" + "\n".join(
        map(str, sorted(extra, key=str)))
