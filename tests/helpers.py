"""What tests share besides fixtures: the repository root, the VLMs of the tiny zoo, and running a console
command the way users do (a process of its own, forked warm by tests/warm.py, its exit code checked by the caller)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from tests import warm

ROOT = Path(__file__).resolve().parents[1]
VLMS = ("llava", "idefics3", "qwen2vl")
COMMANDS = {  # console command -> how to start it from this interpreter (the installed script does the same)
    "cache-teacher": ["-m", "genrecal_cache", "cache-teacher"],
    "inspect-cache": ["-m", "genrecal_cache", "inspect-cache"],
    "train-student": ["-m", "genrecal_train", "train-student"],
    "eval-student": ["-m", "genrecal_train", "eval-student"],
}


def command_line(command: str, *args: object) -> list[str]:
    """The argv that starts `command ARGS...` with this interpreter (each argument as `str`)."""
    return [sys.executable, *COMMANDS[command], *map(str, args)]


def command_env(env: Mapping[str, str] | None = None, drop_env: Iterable[str] = (),
                inherit_env: bool = True) -> dict[str, str]:
    """The command's environment: this process's (unless `inherit_env=False`) less the names in `drop_env`, then
    `env` added, so a name both dropped and given takes `env`'s value."""
    out = dict(os.environ) if inherit_env else {}
    for name in drop_env:
        out.pop(name, None)
    return {**out, **(env or {})}


def run_command(command: str, *args: object, env: Mapping[str, str] | None = None, drop_env: Iterable[str] = (),
                inherit_env: bool = True, timeout: float = 900, cwd: Path | None = None,
                **kwargs: object) -> subprocess.CompletedProcess:
    """`command ARGS...` in a process of its own, as a user runs it (forked from a warm interpreter that has imported
    torch when tests/warm.py can, else started cold with this interpreter); returns the completed process
    (`returncode`, `stdout`, `stderr` as text). `env` adds to this process's environment less `drop_env`
    (`inherit_env=False`: `env` is the whole environment). stdout and stderr are captured unless given (e.g.
    `stdout=subprocess.DEVNULL`); other keywords (`check=True`, `input=...`) go to `subprocess.run`."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("text", True)
    return warm.run(command_line(command, *args), command_env(env, drop_env, inherit_env), timeout=timeout,
                    cwd=cwd or ROOT, **kwargs)


def start_command(command: str, *args: object, env: Mapping[str, str] | None = None, drop_env: Iterable[str] = (),
                  inherit_env: bool = True, cwd: Path | None = None, **kwargs: object) -> subprocess.Popen:
    """`command ARGS...` started and left running (for tests that wait on, kill or race it): the `subprocess.Popen`,
    with `run_command`'s command line, environment and directory; other keywords (`stdout=`, `stderr=`, `text=`,
    `start_new_session=`) go to `Popen`, whose output is not captured unless asked."""
    return warm.popen(command_line(command, *args), command_env(env, drop_env, inherit_env), cwd=cwd or ROOT,
                      **kwargs)


def perturbed_copy(src: Path, dst: Path, delta: float = 0.05) -> Path:
    """A copy of a teacher with one MLP layer of its body changed by `delta`: same config, tokenizer, template and
    head (another checkpoint of the same model)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    with safe_open(weights, "pt") as f:
        meta = f.metadata()
    tensors = load_file(weights)
    key = next(k for k in sorted(tensors) if ".layers.1.mlp." in k and k.endswith("weight"))
    tensors[key] = tensors[key] + delta
    save_file(tensors, weights, metadata=meta)
    return dst


# --- stores on an object store (issue 23) ---------------------------------------------------------------

def _objects(root: str | Path, s3_server) -> dict[str, bytes]:
    """Every array object of the store's parts by key (`<part>/<array>/...`), and the arrays' metadata: what must be
    byte-equal between two stores of the same job (the commit tables and the parts' provenance carry times)."""
    from genrecal_cache.core.locations import Location

    loc = Location.of(str(root), s3_server.storage_options())
    if loc.is_local:
        base = Path(root) / "parts"
        keys = [str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()]
    else:
        prefix = loc.join("parts").path + "/"
        keys = [p[len(prefix):] for p in loc.fs.find(prefix)]
    keep = [k for k in keys if k.count("/") >= 2 and k.split("/")[1] not in ("samples", "rejects")
            and not k.endswith((".lock", "lease.json"))]
    return {k: loc.join("parts", k).read_bytes() for k in sorted(keep)}


def same_store(a: str | Path, b: str | Path, s3_server, where_from_differs: bool = False) -> None:
    """The same committed samples and rejects, and every array object byte for byte. `where_from_differs`: the
    data came from other places (local files, objects), so image paths and reject reasons may name them."""
    opts = s3_server.storage_options()
    from genrecal_cache.store.reader import TeacherStore

    sa, sb = (TeacherStore(x, storage_options=opts) for x in (a, b))
    assert [p.name for p in sa.parts] == [p.name for p in sb.parts] == ["shard-00000-of-00001"]
    drop = ["image_paths"] if where_from_differs else []
    for pa_, pb_ in zip(sa.parts, sb.parts):
        assert pa_.samples.drop(drop).equals(pb_.samples.drop(drop)), "sample tables differ"
        ra, rb = (p.rejects.drop(["reason"] if where_from_differs else []).to_pylist() for p in (pa_, pb_))
        assert ra == rb
    oa, ob = _objects(a, s3_server), _objects(b, s3_server)
    assert sorted(oa) == sorted(ob) and len(oa) > 10
    assert [k for k in oa if oa[k] != ob[k]] == []
