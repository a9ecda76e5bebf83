"""Shared fixtures: the tiny model zoo (built once per run), the demo manifest, a local S3 server, vLLM engines
shared across test files; and how `pytest -n 2` (xdist) splits the tests between its workers (tests/grouping.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # before any kernel is decorated: run Triton kernels on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The hub's paths pinned to their default: a test that moves XDG_CACHE_HOME (genrecal's caches) moves only those,
# whether its command starts cold or forked from tests/warm.py's zygote (which read them at import).
os.environ.setdefault("HF_HOME", os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                              "huggingface"))
torch.set_num_threads(1)  # 2 threads on a busy 2-core machine is slower

from demo_data import write_demo_manifest  # noqa: E402
from tiny_zoo import FAMILY_NAMES, build_zoo  # noqa: E402

from tests.grouping import pytest_collection_modifyitems  # noqa: E402, F401  (xdist's groups: tests/grouping.py)
from tests.helpers import run_command  # noqa: E402


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_zoo(tmp_path_factory.mktemp("zoo"), seed=0)


@pytest.fixture(scope="session")
def demo_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_manifest(tmp_path_factory.mktemp("demo"), n=16, seed=0)


@pytest.fixture(scope="session")
def text_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Text-only conversations for the text LM: one turn, two turns with a system prompt, LLaVA format."""
    rows = [
        {"id": "t0", "messages": [{"role": "user", "content": "What is seven?"},
                                  {"role": "assistant", "content": "A digit."}]},
        {"id": "t1", "messages": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                                  {"role": "user", "content": "three"}, {"role": "assistant", "content": "four five"}]},
        {"id": "t2", "conversations": [{"from": "human", "value": "Say nine."}, {"from": "gpt", "value": "nine"}]},
    ]
    p = tmp_path_factory.mktemp("text") / "text.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


@pytest.fixture(scope="session")
def clean_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo rows without the bad ones."""
    return write_demo_manifest(tmp_path_factory.mktemp("clean"), n=12, seed=1, bad_rows=False)


@pytest.fixture(scope="session")
def family_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The families built only for the family matrix (tests/cache/teacher/test_families.py): Gemma 3, InternVL,
    Granite, mllama."""
    return build_zoo(tmp_path_factory.mktemp("family_zoo"), seed=0, names=FAMILY_NAMES)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 server for the session: SeaweedFS on 127.0.0.1, free ports of its own (tools/s3server.py), one
    bucket (`.bucket`, `.url(*parts)`), credentials (`.storage_options()`, `.env()` for subprocesses), `.stop()` and
    `.start()`; stopped by its pid at the end. No skip: without `weed` it fails, naming the install."""
    from s3server import S3Server, S3ServerError

    server = S3Server(tmp_path_factory.mktemp("s3server"))
    try:
        server.start()
    except S3ServerError as e:
        pytest.fail(str(e), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def cli():
    """Run a console command as users do: `cli("cache-teacher", "--teacher", path, ...)` returns the completed
    subprocess (`returncode`, `stdout`, `stderr`); see `tests/helpers.run_command`."""
    return run_command


@pytest.fixture(scope="session")
def vllm_engine(zoo):
    """vLLM engines shared by the session's tests: `vllm_engine(name_or_path, layers=(0, 1), eager=True, **args)`
    starts a `VLLMTeacher` once per (model, layers, eager, args) and holds one at a time (asking for another closes
    the held one; `vllm_engine.release()` closes it without starting one, for a test that starts its own).

    The engines run in this process (`in_process_teacher`): 3-7 s to start an eager one here instead of 30-40 s for
    the engine's own processes, 25 s for a compiled one instead of a minute more. Tests that are about the data, not
    the engine's processes, share these; those about the processes (killed, started by the CLI) start their own."""
    pytest.importorskip("vllm")  # a test that asks for an engine is skipped, not failed, without vLLM
    held: dict[tuple, object] = {}
    env = dict(os.environ)

    def release() -> None:
        for teacher in held.values():
            teacher.close()
        held.clear()
        for name in set(os.environ) - set(env):  # what vLLM set for its engines (VLLM_*, TORCHINDUCTOR_*)
            if name.startswith(("VLLM_", "TORCHINDUCTOR_")):
                del os.environ[name]

    def get(model: str | Path, layers: tuple[int, ...] = (), eager: bool = True, **args):
        path = str(zoo[model]) if model in zoo else str(model)
        key = (path, tuple(layers), eager, tuple(sorted(args.items())))
        if key not in held:
            release()
            held[key] = in_process_teacher(path, layers=tuple(layers), enforce_eager=eager, **args)
        return held[key]

    get.release = release
    yield get
    release()


def in_process_teacher(path: str, **args):
    """A `VLLMTeacher` whose engines (the pooling one, and the one that writes answers when asked) run in this
    process: vLLM's uniprocess executor with V1 multiprocessing off while each engine starts. What that changes
    in this process is put back: `torch.set_num_threads` (vLLM's CPU worker replaces it) and the environment."""
    import vllm.envs

    from genrecal_cache.teacher.vllm import VLLMTeacher

    class InProcess(VLLMTeacher):
        def _start(self, **engine_args):
            keep, env = torch.set_num_threads, os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            vllm.envs.disable_envs_cache()  # vLLM caches its environment once an engine has started
            try:
                return super()._start(**engine_args)
            finally:
                torch.set_num_threads = keep
                if env is None:
                    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
                else:
                    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = env
                vllm.envs.disable_envs_cache()

    # An explicit KV cache: vLLM's CPU worker otherwise sizes it as its RAM share less this process's whole RSS,
    # which a second engine here (the one that writes answers) finds already spent.
    return InProcess(path, "float32", **{"max_model_len": 1024, "kv_cache_memory_bytes": 256 << 20,
                                         "distributed_executor_backend": "uni", **args})
