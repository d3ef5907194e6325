"""engine._torchpt: the torch-free .pt reader/writer (oracle: torch.save / torch.load)."""
from __future__ import annotations

import pickle
import zipfile

import numpy as np
import pytest

from engine import _torchpt as tp
from engine.errors import CorruptCheckpoint


def _rng():
    return np.random.default_rng(1234)


def test_bf16_conversion_rounds_to_nearest_even():
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5, 3.0e38, np.inf, -0.0], np.float32)
    bits = tp.float32_to_bf16(x)
    back = tp.bf16_to_float32(bits)
    # 1 + 2^-8 is exactly half-way between 1 and 1 + 2^-7: ties go to even (1.0)
    assert back[1] == 1.0
    assert back[2] == np.float32(1.015625)
    assert back[3] == -2.5 and np.isinf(back[5]) and np.signbit(back[6])
    assert np.isnan(tp.bf16_to_float32(tp.float32_to_bf16(np.array([np.nan], np.float32))))[0]


def test_own_round_trip_all_dtypes(tmp_path):
    rng = _rng()
    obj = {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f16": rng.standard_normal((2, 2)).astype(np.float16),
        "f64": rng.standard_normal(5),
        "i64": np.arange(68, dtype=np.int64).reshape(1, 17, 4),
        "i32": np.array([-1, 2], np.int32),
        "u8": np.array([0, 255], np.uint8),
        "b": np.array([True, False]),
        "empty": np.zeros((0, 3), np.float32),
        "meta": [1, -7, 2 ** 40, 2.5, "name", None, (True, False)],
    }
    path = tmp_path / "x.pt"
    tp.save(obj, path)
    back = tp.load(path)
    assert set(back) == set(obj)
    for k, v in obj.items():
        if isinstance(v, np.ndarray):
            assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
            np.testing.assert_array_equal(back[k], v)
    assert back["meta"] == obj["meta"]
    # deterministic bytes
    tp.save(obj, tmp_path / "y.pt")
    assert (tmp_path / "x.pt").read_bytes() != b""
    tp.save(obj, tmp_path / "x2.pt", prefix="x")
    assert (tmp_path / "x.pt").read_bytes() == (tmp_path / "x2.pt").read_bytes()


def test_bf16_round_trip_and_bits_mode(tmp_path):
    x = _rng().standard_normal((4, 1, 1, 8)).astype(np.float32)
    tp.save({"e": tp.BFloat16(x)}, tmp_path / "v.pt")
    f = tp.load(tmp_path / "v.pt")["e"]
    assert f.dtype == np.float32
    np.testing.assert_allclose(f, x, rtol=2 ** -8)
    bits = tp.load(tmp_path / "v.pt", bf16="bits")["e"]
    assert bits.dtype == np.uint16
    np.testing.assert_array_equal(tp.bf16_to_float32(bits), f)


def _pt_with_pickle(path, payload: bytes, extra: dict | None = None):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", payload)
        z.writestr("evil/byteorder", b"little")
        for k, v in (extra or {}).items():
            z.writestr(f"evil/data/{k}", v)


class _Boom:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned",))


def test_refuses_arbitrary_globals(tmp_path):
    path = tmp_path / "evil.pt"
    _pt_with_pickle(path, pickle.dumps({"x": _Boom()}, protocol=2))
    with pytest.raises(CorruptCheckpoint, match="system"):
        tp.load(path)


def test_refuses_non_zip_and_truncated(tmp_path):
    bad = tmp_path / "legacy.pt"
    bad.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CorruptCheckpoint, match="zip"):
        tp.load(bad)
    good = tmp_path / "good.pt"
    tp.save({"a": np.ones((64, 64), np.float32)}, good)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpoint):
        tp.load(trunc)


def test_refuses_storage_size_mismatch_and_out_of_bounds(tmp_path):
    # storage record shorter than numel says
    tp.save({"a": np.arange(8, dtype=np.int64)}, tmp_path / "ok.pt")
    with zipfile.ZipFile(tmp_path / "ok.pt") as z:
        pkl = z.read("ok/data.pkl")
    _pt_with_pickle(tmp_path / "short.pt", pkl, {"0": b"\0" * 8})
    # rename prefix: the pickle does not name its prefix, so the records line up
    with pytest.raises(CorruptCheckpoint, match="expected 64"):
        tp.load(tmp_path / "short.pt")
    # geometry reading past the storage: size 8 with stride 2 over 8 elements
    w = tp._PickleWriter()
    pkl2 = w.dumps({"a": np.arange(8, dtype=np.int64)})
    pkl2 = pkl2.replace(b"(K\x08t(K\x01t", b"(K\x08t(K\x02t")
    assert b"(K\x08t(K\x02t" in pkl2
    _pt_with_pickle(tmp_path / "oob.pt", pkl2, {"0": np.arange(8, dtype=np.int64).tobytes()})
    with pytest.raises(CorruptCheckpoint, match="past its storage"):
        tp.load(tmp_path / "oob.pt")


def test_writer_rejects_unsupported_objects(tmp_path):
    with pytest.raises(TypeError, match="set"):
        tp.save({"a": {1, 2}}, tmp_path / "s.pt")
    assert not (tmp_path / "s.pt").exists()


@pytest.mark.oracle
def test_reads_torch_save_output(tmp_path):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    obj = {
        "embeddings": torch.randn(12, 1, 1, 16, generator=g).to(torch.bfloat16),
        "cache": torch.randint(-2, 2048, (1, 17, 4), generator=g, dtype=torch.int64),
        "half": base.half(),
        "view": base[1:5, 2:7:2],          # non-contiguous, storage offset
        "t": base.t(),                     # transposed strides
        "shared": base,                    # same storage as view/t
        "nested": {"l": [torch.tensor(3), 1.5, "s"]},
        "param": torch.nn.Parameter(torch.ones(2)),
    }
    path = tmp_path / "NATF2.pt"
    torch.save(obj, path)
    out = tp.load(path)
    np.testing.assert_array_equal(out["embeddings"], obj["embeddings"].float().numpy())
    np.testing.assert_array_equal(out["cache"], obj["cache"].numpy())
    np.testing.assert_array_equal(out["half"], obj["half"].numpy())
    np.testing.assert_array_equal(out["view"], obj["view"].numpy())
    np.testing.assert_array_equal(out["t"], obj["t"].numpy())
    np.testing.assert_array_equal(out["shared"], base.numpy())
    assert int(out["nested"]["l"][0]) == 3 and out["nested"]["l"][1:] == [1.5, "s"]
    np.testing.assert_array_equal(out["param"], np.ones(2, np.float32))


@pytest.mark.oracle
def test_torch_reads_our_output(tmp_path):
    torch = pytest.importorskip("torch")
    rng = _rng()
    emb = rng.standard_normal((10, 1, 1, 32)).astype(np.float32)
    cache = rng.integers(0, 2048, (1, 17, 4)).astype(np.int64)
    path = tmp_path / "VARM3.pt"
    tp.save({"embeddings": tp.BFloat16(emb), "cache": cache,
             "f": emb[:2, 0, 0, :4].copy(), "i": 5}, path)
    for kwargs in ({"weights_only": True}, {"weights_only": True, "mmap": True}):
        d = torch.load(path, **kwargs)
        assert d["embeddings"].dtype == torch.bfloat16 and tuple(d["embeddings"].shape) == emb.shape
        # our bf16 rounding equals torch's
        assert torch.equal(d["embeddings"], torch.from_numpy(emb).to(torch.bfloat16))
        assert torch.equal(d["cache"], torch.from_numpy(cache))
        assert torch.equal(d["f"], torch.from_numpy(emb[:2, 0, 0, :4]))
        assert d["i"] == 5
