import gzip
import shutil

import pytest

from nitrofusion.errors import NitroFusionError
from nitrofusion.worlds.mini import data


def test_loads_and_normalises():
    x, y = data.load_split("test", 16)
    assert x.shape == (10000, 1, 16, 16) and y.shape == (10000,)
    assert -1.0 <= x.min() < -0.9 and 0.9 < x.max() <= 1.0
    assert set(y.unique().tolist()) == set(range(10))


def test_missing_files_name_the_package(tmp_path):
    with pytest.raises(NitroFusionError, match="apt-get install dataset-fashion-mnist") as e:
        data.load_split("test", 16, root=str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_corrupt_and_truncated_files_are_detected(tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(data.DATA_DIR / name, tmp_path / name)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not a gzip file")
    with pytest.raises(NitroFusionError, match="corrupt"):
        data.load_split("test", 16, root=str(tmp_path))
    raw = gzip.decompress((data.DATA_DIR / "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(NitroFusionError, match="truncated"):
        data.load_split("test", 16, root=str(tmp_path))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x09\x99" + raw[4:]))
    with pytest.raises(NitroFusionError, match="bad IDX header"):
        data.load_split("test", 16, root=str(tmp_path))


def test_prompts():
    assert data.class_prompts()[0] == "a photo of a T-shirt/top" and len(data.class_prompts()) == 10
