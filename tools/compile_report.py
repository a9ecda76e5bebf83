"""Registers, spills and shared memory of every Triton kernel configuration in kernels/aot.py, compiled ahead of time
for sm_80 / sm_90 on this machine (no GPU); flags spills and configurations over an architecture's limits.

Registers and spills come from the bundled `ptxas -v` run on the kernel's PTX with triton's own ptxas options,
shared memory from the compiled kernel's metadata. Example:
    python tools/compile_report.py --out compile-report.csv      (or: python tools/bench_kernels.py --compile-report)
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from genrecal_kernels import aot

FIELDS = ["config", "kernel", "arch", "num_warps", "registers", "spill_stores", "spill_loads", "stack", "shared",
          "shared_limit", "flags", "sites", "error"]
MAX_THREAD_REGS = 64 * 1024  # registers of one SM's register file: registers x threads of a block must fit


def ptxas_usage(ptx: str, arch: int, metadata: Any) -> dict[str, int]:
    """{registers, spill_stores, spill_loads, stack} (bytes but registers) of `ptx` for sm_`arch` from `ptxas -v`,
    run as triton's make_cubin runs it (its fp-fusion and extra ptxas options from `metadata`)."""
    from triton import knobs
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    extra = ([] if metadata.enable_fp_fusion else ["--fmad=false"]) + (metadata.ptx_options or "").split()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [knobs.nvidia.ptxas.path, "-lineinfo", "-v", "--regAllocOptLevel=2", *extra,
               f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(Path(tmp) / "kernel.cubin")]
        p = subprocess.run(cmd, capture_output=True, text=True)
    log = p.stdout + p.stderr
    if p.returncode != 0:
        raise RuntimeError(f"ptxas failed (rc {p.returncode}): {log[-2000:]}")
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    if not (regs and spills and stack):
        raise RuntimeError(f"cannot parse `ptxas -v` output (a new ptxas?):\n{log[-2000:]}")
    return {"registers": int(regs[1]), "spill_stores": int(spills[1]), "spill_loads": int(spills[2]),
            "stack": int(stack[1])}


def measure(config: aot.Config, arch: int) -> dict[str, Any]:
    """One report row: compile `config` for sm_`arch`, its resource use, and what is wrong with it ("flags")."""
    row: dict[str, Any] = {"config": config.name, "kernel": config.kernel.split(":")[1], "arch": arch,
                           "shared_limit": aot.SMEM_LIMIT[arch], "sites": " ".join(config.sites)}
    try:
        k = aot.compile_for(config, arch)
        row.update(num_warps=k.metadata.num_warps, shared=k.metadata.shared,
                   **ptxas_usage(k.asm["ptx"], arch, k.metadata))
    except Exception as e:  # a compile error is a row of the report, not the end of it
        lines = [x.strip() for x in f"{type(e).__name__}: {e}".splitlines() if x.strip()]
        row.update(error=" ... ".join(dict.fromkeys([lines[0], lines[-1]]))[:300], flags="COMPILE-ERROR")
        return row
    flags = []
    if row["spill_stores"] or row["spill_loads"]:
        flags.append("spills")
    if row["shared"] > aot.SMEM_LIMIT[arch]:
        flags.append("smem>limit")
    if row["registers"] > aot.MAX_REGS or row["registers"] * row["num_warps"] * 32 > MAX_THREAD_REGS:
        flags.append("regs>limit")
    row["flags"] = " ".join(flags)
    return row


def _measure_named(name: str, arch: int) -> dict[str, Any]:
    return measure(next(c for c in aot.configurations() if c.name == name), arch)


def report(configs: list[aot.Config], archs: list[int], jobs: int = 1) -> list[dict[str, Any]]:
    """Rows for every (configuration, arch), in table order; `jobs` worker processes."""
    if jobs <= 1:
        return [measure(c, a) for c in configs for a in archs]
    names, arch_list = zip(*[(c.name, a) for c in configs for a in archs])
    with cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_measure_named, names, arch_list))


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table, one line per configuration with each architecture's numbers side by side."""
    archs = sorted({r["arch"] for r in rows})
    by_config: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_config.setdefault(r["config"], {})[r["arch"]] = r

    def per_arch(rs: dict[int, dict], f) -> str:
        return " / ".join("err" if rs[a].get("error") else f(rs[a]) for a in archs if a in rs)

    arch_names = " / ".join(f"sm_{a}" for a in archs)
    header = (f"| configuration | warps | registers ({arch_names}) | spill st/ld B ({arch_names}) | "
              f"shared B ({arch_names}) | flags |")
    lines = [header, "|---|---|---|---|---|---|"]
    for name, rs in by_config.items():
        first = next(iter(rs.values()))
        flags = sorted({f for r in rs.values() for f in (r.get("flags") or "").split()})
        lines.append(f"| {name} | {first.get('num_warps', '')} | {per_arch(rs, lambda r: str(r['registers']))} | "
                     f"{per_arch(rs, lambda r: str(r['spill_stores']) + '/' + str(r['spill_loads']))} | "
                     f"{per_arch(rs, lambda r: str(r['shared']))} | {' '.join(flags)} |")
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})


def main(argv: list[str] | None = None) -> int:
    """Print the report (Markdown) and a summary; 1 if a configuration fails to compile or exceeds a limit."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=list(aot.ARCHS), help="compute capabilities (80 90)")
    ap.add_argument("--default-run", action="store_true", help="only the configurations of the default test run")
    ap.add_argument("--only", nargs="+", help="configuration names, or prefixes such as ce_kl_rows/ or matmul/")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes")
    ap.add_argument("--out", type=Path, help="also write the rows as CSV here")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 turns the kernels into interpreter functions that cannot be compiled: run "
              "`env -u TRITON_INTERPRET python tools/compile_report.py`", file=sys.stderr)
        return 2
    if missing := aot.toolchain_missing():
        print(f"cannot compile for CUDA here: {missing}", file=sys.stderr)
        return 2
    configs = [c for c in aot.configurations() if (not args.default_run or c.default)
               and (not args.only or any(c.name.startswith(o) for o in args.only))]
    if not configs:
        ap.error("no configuration matches; see kernels/aot.py for the names")
    rows = report(configs, args.arch, args.jobs)
    print(markdown(rows))
    if args.out:
        write_csv(rows, args.out)
        print(f"wrote {args.out}")
    bad = [r for r in rows if r.get("error") or "limit" in (r.get("flags") or "")]
    spilling = [r for r in rows if "spills" in (r.get("flags") or "")]
    ok = [r for r in rows if not r.get("error")]
    print(f"{len(rows)} compiles ({len(configs)} configurations x {len(args.arch)} archs): {len(bad)} failing or over "
          f"a limit, {len(spilling)} spilling; max registers {max((r['registers'] for r in ok), default=0)}, max "
          f"shared {max((r['shared'] for r in ok), default=0)} B")
    for r in bad + spilling:
        print(f"  {r['config']} sm_{r['arch']}: {r.get('flags')} {r.get('error', '')}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
