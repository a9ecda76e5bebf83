"""Reject reasons counted by kind: numbers fold, words with digits in them stay."""

from __future__ import annotations

import pytest

from genrecal_cache.core.errors import reason_kind


@pytest.mark.parametrize("a, b, kind", [
    ("row 12 has 3 images", "row 7 has 21 images", "row N has N images"),
    ("image 'a.png' is 2.5x too large", "image 'b.png' is 10x too large", "image '…' is Nx too large"),
    ("image of 640x480 is not base64", "image of 32x32 is not base64", "image of NxN is not base64"),
    ("not utf-8 at byte -17", "not utf-8 at byte -3", "not utf-8 at byte -N"),
    ("sha256 of row 3 differs", "sha256 of row 4 differs", "sha256 of row N differs"),
])
def test_reasons_fold_to_one_kind(a, b, kind):
    assert reason_kind(a) == reason_kind(b) == kind
