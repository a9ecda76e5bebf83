"""Shared fixtures: the tiny model zoo (built once per run), the demo manifest, a local S3 server."""

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
torch.set_num_threads(1)  # 2 threads on a busy 2-core machine is slower

from demo_data import write_demo_manifest  # noqa: E402
from tiny_zoo import FAMILY_NAMES, build_zoo  # noqa: E402

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
