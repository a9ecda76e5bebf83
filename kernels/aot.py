"""Every Triton kernel here with each launch configuration its launchers can choose on CUDA, compiled ahead of time
for sm_80 / sm_90 without a GPU: the table behind tests/kernels/test_aot_compile.py and tools/compile_report.py."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

ARCHS = (80, 90)  # A100, H100/H200
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # usable shared memory per block (bytes), opt-in maximum
MAX_REGS = 255  # registers per thread
# Constexprs the launchers pick from the device (CUDA vs CPU / interpreter), not from the inputs: a launch on CPU
# tensors under TRITON_INTERPRET=1 cannot be compared with the table on these.
DEVICE_CHOSEN = frozenset({"BLOCK_M", "BLOCK_N", "BLOCK_K", "DOT_BF16"})

# Realistic sizes. Only how the JIT specialises an int matters for the code (== 1: a constant; % 16 == 0: marked
# divisible by 16; >= 2**31: i64), so one value stands for every size of its kind.
TOKENS = 1000  # rows of a chunk / answer tokens: any count, not a multiple of 16
D_S, D_L = 896, 3584  # student / teacher hidden sizes (Qwen2-0.5B, Qwen2-7B); all real ones are multiples of 16
# ProjPost widths D_l, one per BLOCK = next_pow2(D_l) from 64 to 8192 (hidden sizes 1536, 4096 and 5120 specialise
# as 2048, 3584 and 8192 do).
HIDDEN = (64, 128, 256, 512, 896, 2048, 3584, 8192)
# CE row kernel vocabularies: small ones (BLOCK_V = next_pow2(V) < 4096; the tests' tiny models) and real ones
# (BLOCK_V 4096): V % 16 == 0 (152064; 32000, 128256, 151936, 256000 specialise alike) and not (GPT-2's 50257).
VOCABS = (256, 512, 1000, 2048, 152064, 50257)
FEATURES = (torch.uint16, torch.bfloat16, torch.float16, torch.float32)  # stored teacher features (proj_pre's x)
PARAMS = (torch.float32, torch.bfloat16, torch.float16)  # Recalibrator parameter / activation dtypes
# The fast test run: per kernel the hot configurations (bf16 training, fp32, each flag); `slow` runs the rest.
DEFAULT_RUN = ("ce_kl_rows/V152064/softcap", "ce_kl_rows/V152064/nosoftcap", "ce_kl_rows/V1000/nosoftcap",
               "matmul/proj_pre.fwd/au16-bu16-cbf16-bias", "matmul/proj_pre.fwd/afp32-bfp32-cfp32-bias",
               "matmul/proj_pre.fwd/afp16-bfp16-cfp16", "matmul/proj_pre.bwd/au16-bu16-cfp32",
               "matmul/proj_post/au16-bu16-cfp32-bias", "ln_forward/D3584/bf16", "ln_backward/D3584/bf16",
               "ln_forward/D8192/fp32", "ln_backward/D8192/fp32")
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint16: "u16", torch.int64: "i64"}


@dataclass(frozen=True)
class Config:
    """One launch as the launcher makes it on CUDA: `args` are the runtime arguments by name (pointers as meta
    tensors of the launched dtype: 16-byte aligned, as fresh allocations are), `constexprs` the tl.constexpr ones,
    `options` the launch options it passes (num_warps, ...). `sites`: the launcher calls that make it."""

    name: str
    kernel: str  # "module:attribute" inside this package
    args: tuple[tuple[str, Any], ...]
    constexprs: tuple[tuple[str, Any], ...]
    options: tuple[tuple[str, Any], ...] = ()
    sites: tuple[str, ...] = ()

    @property
    def default(self) -> bool:
        """In the fast test run (DEFAULT_RUN); the rest run under the `slow` marker."""
        return self.name in DEFAULT_RUN

    def key(self, full: bool = True) -> tuple:
        """What a launch is compared on: kernel, pointer dtypes, constexprs (those in DEVICE_CHOSEN and the
        options only with `full`)."""
        return launch_key(self.kernel, dict(self.args + self.constexprs), dict(self.options), full)


def _ptr(dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(0, dtype=dtype, device="meta")  # data_ptr() == 0: aligned; never touches a device


def _bits(dtype: torch.dtype) -> torch.dtype:
    """The dtype `recal_proj._bits` hands the matmul kernel: bf16 as its uint16 bits."""
    return torch.uint16 if dtype == torch.bfloat16 else dtype


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()  # triton.next_power_of_2, which the launchers call


def constexpr_names(kernel: Any) -> tuple[str, ...]:
    """The `tl.constexpr` parameters of a @triton.jit kernel (compiled or interpreted)."""
    params = inspect.signature(getattr(kernel, "fn", kernel)).parameters.values()
    return tuple(p.name for p in params if "constexpr" in str(p.annotation))


def launch_key(kernel: str, args: dict[str, Any], options: dict[str, Any], full: bool = True) -> tuple:
    """(kernel, pointer dtypes, constexprs[, num_warps, num_stages]) of a launch, from its arguments by name."""
    fn = resolve(kernel)
    consts = constexpr_names(fn)
    ptrs = tuple((k, SHORT.get(v.dtype, str(v.dtype))) for k, v in args.items() if isinstance(v, torch.Tensor))
    flags = tuple((k, args[k]) for k in consts if full or k not in DEVICE_CHOSEN)
    opts = (options.get("num_warps"), options.get("num_stages")) if full else ()
    return (kernel, ptrs, flags, opts)


def _ce_rows(v: int, softcap: bool) -> Config:
    """fused_linear_ce_kl._rows_triton on CUDA: fp32 logits (C, V) whatever the input dtype (_pre_activation),
    int64 targets, BLOCK_V = min(next_pow2(V), 4096), 8 warps from BLOCK_V 2048."""
    block = min(_next_pow2(v), 4096)
    f32 = _ptr(torch.float32)
    args = (("xr_ptr", f32), ("xz_ptr", f32), ("target_ptr", _ptr(torch.int64)), ("row_scale_ptr", f32),
            ("ce_ptr", f32), ("kl_ptr", f32), ("stride", v), ("V", v), ("scale", 1.0), ("softcap", 30.0),
            ("inv_t", 1.0), ("w_ce", 1.0), ("w_kl_t", 1.0))
    return Config(f"ce_kl_rows/V{v}/{'softcap' if softcap else 'nosoftcap'}", "fused_linear_ce_kl:_ce_kl_rows_kernel",
                  args, (("HAS_SOFTCAP", softcap), ("BLOCK_V", block)), (("num_warps", 8 if block >= 2048 else 4),),
                  ("fused_linear_ce_kl._rows_triton",))


def _matmul(site: str, a: torch.dtype, b: torch.dtype, c: torch.dtype, bias: torch.dtype | None,
            shape: tuple[int, int, int], strides: tuple[int, ...]) -> Config:
    """recal_proj._mm_triton on CUDA: uint16 operands are bf16 bits, bf16 dot when either is, 64x64x64 blocks,
    default warps, one stage for mixed fp32/fp16 operands (else the default). `a`, `b`: the dtypes after `_bits`;
    `bias` None passes `c` in its place."""
    m, n, k = shape
    half = torch.uint16 in (a, b)
    args = (("a_ptr", _ptr(a)), ("b_ptr", _ptr(b)), ("c_ptr", _ptr(c)), ("bias_ptr", _ptr(bias or c)), ("M", m),
            ("N", n), ("K", k), *zip(("s_am", "s_ak", "s_bk", "s_bn", "s_cm", "s_cn"), strides))
    consts = (("A_BITS", a == torch.uint16), ("B_BITS", b == torch.uint16), ("HAS_BIAS", bias is not None),
              ("DOT_BF16", half), ("BLOCK_M", 64), ("BLOCK_N", 64), ("BLOCK_K", 64))
    name = f"matmul/{site}/a{SHORT[a]}-b{SHORT[b]}-c{SHORT[c]}{'-bias' if bias else ''}"
    stages = (("num_stages", 1),) if a != b and not half else ()
    return Config(name, "recal_proj:_matmul_kernel", args, consts, stages, (f"recal_proj.{site}",))


def _matmuls() -> Iterator[Config]:
    """The three call sites of _mm_triton over stored-feature dtypes x parameter dtypes, bias or not."""
    for p in PARAMS:
        for bias in (p, None):
            for f in FEATURES:  # ProjPre forward: x (T, D_l) @ W.T (D_l, D_s) + b -> (T, D_s) in W's dtype
                yield _matmul("proj_pre.fwd", _bits(f), _bits(p), p, bias, (TOKENS, D_S, D_L),
                              (D_L, 1, 1, D_L, D_S, 1))
            # ProjPost forward and its backward's recompute: h (C, D_s) @ W.T (D_s, D_l) + b -> fp32 (C, D_l)
            yield _matmul("proj_post", _bits(p), _bits(p), torch.float32, bias, (TOKENS, D_L, D_S),
                          (D_S, 1, 1, D_S, D_L, 1))
        for f in FEATURES:  # ProjPre backward: dy.T (D_s, T) @ x (T, D_l) -> fp32 dW (D_s, D_l)
            yield _matmul("proj_pre.bwd", _bits(p), _bits(f), torch.float32, None, (D_S, D_L, TOKENS),
                          (1, D_S, D_L, 1, D_L, 1))


def _layernorms() -> Iterator[Config]:
    """recal_proj's LayerNorm row kernels on fp32 u (C, D_l), BLOCK = next_pow2(D_l), default warps."""
    f32 = _ptr(torch.float32)
    for p in PARAMS:
        for d in HIDDEN:
            block = _next_pow2(d)
            fwd = (("u_ptr", f32), ("y_ptr", _ptr(p)), ("w_ptr", _ptr(p)), ("b_ptr", _ptr(p)), ("mean_ptr", f32),
                   ("rstd_ptr", f32), ("N", d), ("eps", 1e-5))
            yield Config(f"ln_forward/D{d}/{SHORT[p]}", "recal_proj:_ln_forward_kernel", fwd, (("BLOCK", block),), (),
                         ("recal_proj.ProjPostLNFunction.forward",))
            bwd = (("u_ptr", f32), ("dy_ptr", _ptr(p)), ("w_ptr", _ptr(p)), ("mean_ptr", f32), ("rstd_ptr", f32),
                   ("du_ptr", f32), ("N", d))
            yield Config(f"ln_backward/D{d}/{SHORT[p]}", "recal_proj:_ln_backward_kernel", bwd, (("BLOCK", block),), (),
                         ("recal_proj.ProjPostLNFunction.backward",))


def _int_kind(v: Any) -> Any:
    """An argument as the JIT specialises it (ints: 1, i32 / i64, divisible by 16 or not; tensors: dtype)."""
    if isinstance(v, torch.Tensor):
        return v.dtype
    if isinstance(v, bool) or not isinstance(v, int):
        return v
    return 1 if v == 1 else ("i64" if abs(v) >= 2**31 else "i32", v % 16 == 0)


def configurations() -> Iterator[Config]:
    """Every launch configuration, each once: launches that specialise alike are merged and list all their sites.
    uld_loss has no Triton kernel (PyTorch only); _tanh / _activate / _load_as_f32 are device functions, compiled
    inside the kernels that call them."""
    seen: dict[tuple, Config] = {}
    for c in (*(_ce_rows(v, s) for v in VOCABS for s in (False, True)), *_matmuls(), *_layernorms()):
        k = (c.kernel, tuple((n, _int_kind(v)) for n, v in c.args), c.constexprs, c.options)
        if k in seen:
            old = seen[k]
            seen[k] = Config(old.name, old.kernel, old.args, old.constexprs, old.options,
                             tuple(dict.fromkeys(old.sites + c.sites)))
        else:
            seen[k] = c
    yield from seen.values()


# --- compiling ------------------------------------------------------------------------------------------------

def resolve(kernel: str) -> Any:
    """The kernel object named "module:attribute" in this package (a JITFunction, or an InterpretedFunction under
    TRITON_INTERPRET=1)."""
    module, attr = kernel.split(":")
    mod = importlib.import_module(f"{__package__}.{module}")
    if not hasattr(mod, attr):
        raise RuntimeError(f"{__package__}.{module} has no {attr}: is triton installed (pip install triton)?")
    return getattr(mod, attr)


def check(config: Config) -> None:
    """A ValueError unless `config` names exactly the kernel's parameters, in order, and its constexprs as such."""
    fn = resolve(config.kernel)
    names = list(inspect.signature(getattr(fn, "fn", fn)).parameters)
    given = [n for n, _ in config.args + config.constexprs]
    consts = [n for n, _ in config.constexprs]
    if names != given or list(constexpr_names(fn)) != consts:
        raise ValueError(f"{config.name}: kernel {config.kernel} takes {names} (constexpr: {constexpr_names(fn)}), "
                         f"kernels/aot.py gives {given} (constexpr: {consts}); update kernels/aot.py to match the "
                         "kernel and its launcher")


def toolchain_missing() -> str | None:
    """Why nothing can be compiled here (no triton, no CUDA backend, no ptxas), or None."""
    try:
        from triton import knobs
        from triton.backends import backends
    except ImportError:
        return "triton is not installed (pip install triton)"
    if "nvidia" not in backends:
        return f"this triton has no CUDA backend (it has {sorted(backends)}): install the PyPI triton wheel"
    try:
        _ = knobs.nvidia.ptxas.path  # the bundled triton/backends/nvidia/bin/ptxas, or TRITON_PTXAS_PATH
    except RuntimeError as e:
        return f"triton's ptxas is missing ({e}): reinstall triton, or point TRITON_PTXAS_PATH at a CUDA ptxas"
    return None


def _jit(config: Config) -> Any:
    from triton.runtime.jit import JITFunction

    fn = resolve(config.kernel)
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{config.kernel} is a {type(fn).__name__}, not a JITFunction: TRITON_INTERPRET=1 builds "
                           "interpreter kernels (and an interpreter triton.language) that cannot be compiled. Run "
                           "without it: `env -u TRITON_INTERPRET python -m genrecal_kernels.aot`")
    return fn


def specialize(config: Config, arch: int) -> tuple[dict, dict, dict, Any]:
    """(signature, constexprs, attrs, options) exactly as JITFunction.run derives them at a launch with these
    arguments, from triton's own binder, for a CUDA target of compute capability `arch`. Uses triton internals
    (create_function_from_signature, JITFunction._pack_args; triton 3.7): another triton may need this updated."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _jit(config)
    check(config)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = {"debug": fn.debug or knobs.runtime.debug, "instrumentation_mode": knobs.compilation.instrumentation_mode,
              **dict(config.options)}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, kwargs = binder(**dict(config.args + config.constexprs), **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, kwargs)
    return signature, constexprs, attrs, options


def compile_for(config: Config, arch: int) -> Any:
    """triton.compile of `config` for sm_`arch`: a CompiledKernel with PTX and cubin (`.asm`) and its metadata
    (`shared` bytes, num_warps). Needs triton with its CUDA backend (ptxas is bundled); no GPU, no CUDA init."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = specialize(config, arch)
    return triton.compile(ASTSource(_jit(config), signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                          options=options.__dict__)


def main(argv: list[str] | None = None) -> int:
    """Compile configurations in this process and print one JSON line per (config, arch): the tests' worker."""
    ap = argparse.ArgumentParser(description="Compile the kernels ahead of time; one JSON line per result.")
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    ap.add_argument("--only", nargs="*", help="configuration names (default: all)")
    args = ap.parse_args(argv)
    configs = {c.name: c for c in configurations()}
    names = args.only if args.only is not None else list(configs)
    unknown = sorted(set(names) - set(configs))
    if unknown:
        ap.error(f"unknown configurations {unknown}; see kernels/aot.py")
    for name in names:
        for arch in args.arch:
            row: dict[str, Any] = {"name": name, "arch": arch}
            t0 = time.perf_counter()
            try:
                with contextlib.redirect_stdout(sys.stderr):  # triton prints the PTX of a failed ptxas run
                    k = compile_for(configs[name], arch)
                row.update(ok=True, shared=k.metadata.shared, num_warps=k.metadata.num_warps,
                           ptx_bytes=len(k.asm["ptx"]), cubin_bytes=len(k.asm["cubin"]))
            except Exception as e:  # every compile error, reported per configuration
                row.update(ok=False, error=f"{type(e).__name__}: {e}"[-4000:])
            row["seconds"] = round(time.perf_counter() - t0, 2)
            print(json.dumps(row), flush=True)
    print(json.dumps({"cuda_initialized": torch.cuda.is_initialized()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
