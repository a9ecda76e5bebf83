"""The distribution installs `kernels/` as `genrecal_kernels` and never as a top-level `kernels` package."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from tests.helpers import ROOT, run_command


def test_wheel_has_no_top_level_kernels(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("genrecal-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if "/" in n and ".dist-info" not in n}
    assert tops == {"genrecal_cache", "genrecal_train", "genrecal_kernels"}, tops
    assert "genrecal_kernels/__init__.py" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "cache-teacher" in entry_points and "inspect-cache" in entry_points


def test_installed_distribution_maps_kernels_to_genrecal_kernels(tmp_path):
    """Outside the source tree, `genrecal_kernels` imports from our folder and `kernels` is not ours."""
    probe = ("import importlib.util, genrecal_kernels; s = importlib.util.find_spec('kernels'); "
             "print(genrecal_kernels.__file__); print(s.origin if s else None)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    ours, theirs = out.stdout.split("\n")[:2]
    assert ours.startswith(str(ROOT / "kernels"))
    assert theirs == "None" or not theirs.startswith(str(ROOT)), theirs


def test_phase_one_never_imports_the_trainer(tmp_path):
    """`genrecal_cache` works without `genrecal_train` (the one-way dependency the layout states): importing every
    module of it, the CLI included, loads nothing of the trainer."""
    pkg = ROOT / "genrecal_cache"
    mods = sorted(".".join(f.relative_to(pkg).with_suffix("").parts) for f in pkg.rglob("*.py")
                  if f.stem not in ("__init__", "__main__", "vllm", "vllm_layers"))
    assert "job.cache_job" in mods and "cli" in mods
    probe = (f"import sys, importlib; [importlib.import_module('genrecal_cache.' + m) for m in {mods!r}]; "
             "print(sorted(m for m in sys.modules if m.startswith('genrecal_train')))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    assert "entry-points.\"genrecal.inspect_plot\"" in (ROOT / "pyproject.toml").read_text()


def test_choice_flags_list_their_values_and_refuse_others(tmp_path):
    """Choice options are enums: --help lists the values, and typer refuses another with exit code 2."""
    help_ = run_command("train-student", "--help", env={"COLUMNS": "250", "PATH": ""}, inherit_env=False, timeout=120)
    assert help_.returncode == 0, help_.stderr
    for values in ("1|2|3|all", "features|embeddings", "auto|triton|chunked|naive"):
        assert values in help_.stdout, values
    bad = run_command("cache-teacher", "--teacher", "t", "--manifest", "m.jsonl", "--output", tmp_path / "s",
                      "--backend", "tgi", timeout=120)
    assert bad.returncode == 2 and "hf" in bad.stderr and "vllm" in bad.stderr and "Traceback" not in bad.stderr
