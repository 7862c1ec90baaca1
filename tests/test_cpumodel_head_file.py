"""A damaged head.pt fails with an error that names the file (issue 11 item 9)."""

import numpy as np
import pytest

from models.heads import Head, load_head


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_head_file_is_named_in_the_error(tmp_path, damage):
    head = Head(kind="logistic", mean=np.zeros(4, np.float32), std=np.ones(4, np.float32),
                params={"w": np.ones(4, np.float32), "b": np.zeros(1, np.float32)})
    path = head.save(tmp_path / "tier" / "head.pt")
    raw = path.read_bytes()
    path.write_bytes({"truncated": raw[: len(raw) // 2], "empty": b"", "garbage": b"\x00junk" * 9}[damage])
    with pytest.raises(ValueError) as info:
        load_head(path)
    assert str(path) in str(info.value) and "truncated or corrupt" in str(info.value)
