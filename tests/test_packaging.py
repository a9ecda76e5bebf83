"""The distribution installs `kernels/` as `genrecal_kernels` and never as a top-level `kernels` package."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from .conftest import ROOT


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
