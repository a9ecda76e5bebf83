"""Untrusted stores, checkpoints and models stay harmless: no pickle, no remote code unless asked."""

from __future__ import annotations

import ast

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.reliability
SOURCES = sorted(p for d in ("genrecal_cache", "genrecal_train", "kernels") for p in (ROOT / d).rglob("*.py"))


def _calls(name: str):
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(name):
                yield path, node


def test_every_torch_load_is_weights_only():
    calls = list(_calls("torch.load"))
    assert calls, "the trainer loads its state with torch.load"
    for path, node in calls:
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        assert kw.get("weights_only") == "True", f"{path.relative_to(ROOT)}:{node.lineno} loads with pickle"


def test_no_pickle_and_remote_code_only_from_the_flag():
    # One exception: DataLoader workers hand their blocks to the main process as pickled bytes over a pipe
    # (genrecal_train/data.py); those bytes come from our own child process, never from a file or a store.
    ipc = ROOT / "genrecal_train" / "data.py"
    for path in SOURCES:
        text = path.read_text()
        if path == ipc:
            assert "pickle.load(" not in text and text.count("pickle.loads(") == 1, path
            continue
        assert "import pickle" not in text and "pickle.load" not in text, path
        assert "trust_remote_code=True" not in text, f"{path.relative_to(ROOT)} enables remote code by itself"
    for path, node in _calls("from_pretrained"):
        for k in node.keywords:
            if k.arg == "trust_remote_code":
                assert ast.unparse(k.value) == "trust_remote_code", f"{path.relative_to(ROOT)}:{node.lineno}"


def test_the_cli_default_is_no_remote_code():
    from genrecal_cache.job.config import CacheConfig

    assert CacheConfig.__dataclass_fields__["trust_remote_code"].default is False


def test_a_store_whose_attributes_are_not_ours_is_refused(tmp_path):
    import json

    from genrecal_cache.core.errors import StoreError
    from genrecal_cache.store.reader import TeacherStore

    (tmp_path / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                   "attributes": {"genrecal": {"format_version": 999}}}))
    with pytest.raises(StoreError, match="store format 999"):
        TeacherStore(tmp_path)
