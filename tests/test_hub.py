"""engine.hub: file checks, voices.tgz extraction, and the download path against a local fake hub.

The fake hub is a tiny HTTP server on 127.0.0.1 that speaks the part of the Hugging Face protocol
`hf_hub_download` uses (HEAD/GET /<repo>/resolve/<rev>/<file> with X-Repo-Commit / ETag headers and
X-Error-Code on errors). No test touches the internet.
"""
from __future__ import annotations

import hashlib
import io
import json
import socket
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from engine import _torchpt, hub
from engine.errors import (
    CorruptCheckpoint,
    GatedModelError,
    ModelNotFound,
    NetworkError,
    ResourceError,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save
    return save(tensors)


def _voices_tgz(names=("NATF0", "NATM1")) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        d = tarfile.TarInfo("voices")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for i, n in enumerate(names):
            pt = io.BytesIO()
            tmp = Path(f"/tmp/_hubtest_{n}_{threading.get_ident()}.pt")
            _torchpt.save({"embeddings": np.full((3, 1, 1, 4), i, np.float32),
                           "cache": np.zeros((1, 17, 4), np.int64)}, tmp)
            pt.write(tmp.read_bytes())
            tmp.unlink()
            info = tarfile.TarInfo(f"voices/{n}.pt")
            info.size = len(pt.getvalue())
            tf.addfile(info, io.BytesIO(pt.getvalue()))
    return buf.getvalue()


def _model_files() -> dict[str, bytes]:
    return {
        hub.LM_FILE: _safetensors_bytes({"text_emb.weight": np.ones((5, 4), np.float32),
                                         "out_norm.alpha": np.ones((1, 1, 4), np.float32)}),
        hub.MIMI_FILE: _safetensors_bytes({"encoder.model.0.conv.conv.weight": np.ones((2, 1, 7), np.float32)}),
        hub.TOKENIZER_FILE: b"not really a sentencepiece model",
        hub.VOICES_ARCHIVE: _voices_tgz(),
    }


class FakeHub:
    """Repos: fake/ok (complete), fake/gated, fake/missing (no LM file), fake/trunc (LM cut short)."""

    def __init__(self):
        files = _model_files()
        self.repos = {
            "fake/ok": dict(files),
            "fake/missing": {k: v for k, v in files.items() if k != hub.LM_FILE},
            "fake/trunc": {**files, hub.LM_FILE: files[hub.LM_FILE][:-7]},
            "fake/gated": dict(files),
            "fake/withconfig": {**files, hub.CONFIG_FILE: json.dumps({"lm": {"dim": 4}, "mimi": {}}).encode()},
        }
        self.requests: list[tuple[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool):
                outer.requests.append((self.command, self.path))
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404, "RepoNotFound")
                repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
                if repo not in outer.repos:
                    return self._error(401, "RepoNotFound")
                if repo == "fake/gated":
                    return self._error(403 if self.headers.get("authorization") else 401, "GatedRepo")
                data = outer.repos[repo].get(filename)
                if data is None:
                    return self._error(404, "EntryNotFound")
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", '"' + hashlib.sha1(data).hexdigest() + '"')
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _error(self, code, error_code):
                self.send_response(code)
                self.send_header("X-Error-Code", error_code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def fake_hub():
    h = FakeHub()
    yield h
    h.close()


@pytest.fixture
def hf_env(tmp_path, monkeypatch):
    """Isolated HF home/cache, no token, online."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_get_token", lambda: None)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    return tmp_path / "hub_cache"


def _resolve(fake_hub, repo, cache, **kw):
    kw.setdefault("token", False)
    return hub.resolve_model(repo, cache_dir=cache, endpoint=fake_hub.endpoint, progress=False,
                             check_resources=kw.pop("check_resources", False), **kw)


# ---------------------------------------------------------------------------------------------
# download path


def test_download_complete_repo(fake_hub, hf_env):
    files = _resolve(fake_hub, "fake/ok", hf_env)
    assert files.lm.name == hub.LM_FILE and files.lm.is_file()
    assert files.lm.read_bytes() == fake_hub.repos["fake/ok"][hub.LM_FILE]
    assert files.mimi.is_file() and files.tokenizer.is_file()
    assert sorted(p.name for p in files.voices_dir.glob("*.pt")) == ["NATF0.pt", "NATM1.pt"]
    # voices unpacked next to the cached archive, inside the hub cache
    assert files.voices_dir.parent == (files.root / hub.VOICES_ARCHIVE).resolve().parent
    assert str(files.voices_dir).startswith(str(hf_env))
    assert _torchpt.load(files.voices_dir / "NATM1.pt")["embeddings"][0, 0, 0, 0] == 1.0
    assert files.config is None and files.source == "fake/ok" and not files.is_tiny
    # a non-default repo may carry engine_config.json: it was asked for (404 here, tolerated)
    assert any(p.endswith(hub.CONFIG_FILE) for _, p in fake_hub.requests)


def test_config_from_repo(fake_hub, hf_env):
    files = _resolve(fake_hub, "fake/withconfig", hf_env)
    assert files.config == {"lm": {"dim": 4}, "mimi": {}}


def test_offline_uses_cache_and_names_missing(fake_hub, hf_env, monkeypatch):
    _resolve(fake_hub, "fake/ok", hf_env)
    n = len(fake_hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = _resolve(fake_hub, "fake/ok", hf_env)  # offline=None follows the env var
    assert files.lm.is_file()
    assert len(fake_hub.requests) == n, "offline mode must not touch the network"
    with pytest.raises(ModelNotFound, match=r"(?s)model\.safetensors.*HF_HUB_OFFLINE.*--model-dir"):
        _resolve(fake_hub, "fake/missing", hf_env)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ModelNotFound, match="offline"):
        _resolve(fake_hub, "fake/trunc", hf_env, offline=True)


def test_gated_without_and_with_token(fake_hub, hf_env):
    with pytest.raises(GatedModelError) as e:
        _resolve(fake_hub, "fake/gated", hf_env)
    msg = str(e.value)
    assert "accept the license" in msg and "HF_TOKEN" in msg and "hf auth login" in msg
    assert f"{fake_hub.endpoint}/fake/gated" in msg
    with pytest.raises(GatedModelError, match="no access"):
        _resolve(fake_hub, "fake/gated", hf_env, token="hf_fake")


def test_missing_file_and_repo(fake_hub, hf_env):
    with pytest.raises(ModelNotFound, match=r"fake/missing has no file model\.safetensors"):
        _resolve(fake_hub, "fake/missing", hf_env)
    with pytest.raises(ModelNotFound, match="fake/nope was not found"):
        _resolve(fake_hub, "fake/nope", hf_env)


def test_truncated_download_is_caught_before_loading(fake_hub, hf_env):
    with pytest.raises(CorruptCheckpoint, match=r"(?s)truncated.*text_emb\.weight|out_norm") as e:
        _resolve(fake_hub, "fake/trunc", hf_env)
    assert "download it again" in str(e.value) and "--force-download" in str(e.value)
    # a cached blob cut short (interrupted copy, full disk): caught, and force_download repairs it
    files = _resolve(fake_hub, "fake/ok", hf_env)
    blob = files.lm.resolve()
    blob.write_bytes(blob.read_bytes()[:-3])
    with pytest.raises(CorruptCheckpoint, match="--force-download"):
        _resolve(fake_hub, "fake/ok", hf_env, offline=True)
    files = _resolve(fake_hub, "fake/ok", hf_env, force_download=True)
    assert hub.check_safetensors(files.lm)["text_emb.weight"]["shape"] == [5, 4]


def test_network_down(hf_env, monkeypatch):
    import huggingface_hub.utils._http as hf_http
    monkeypatch.setattr(hf_http.time, "sleep", lambda s: None)  # skip the library's retry backoff
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(NetworkError) as e:
        hub.resolve_model("fake/ok", cache_dir=hf_env, endpoint=f"http://127.0.0.1:{port}",
                          progress=False, token=False, check_resources=False)
    assert "HF_HUB_OFFLINE=1" in str(e.value) and "--model-dir" in str(e.value)
    assert time.monotonic() - t0 < 20


def test_disk_check_before_download(fake_hub, hf_env, monkeypatch):
    import shutil as _sh
    real = _sh.disk_usage
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(ResourceError, match="disk space"):
        _resolve(fake_hub, "fake/ok", hf_env, check_resources=True)
    assert not (hf_env / "models--fake--ok" / "blobs").exists() or not any(
        (hf_env / "models--fake--ok" / "blobs").iterdir())


def test_memory_check(tmp_path, monkeypatch):
    d = _local_dir(tmp_path)
    files = hub.resolve_model(d, check_resources=False)
    monkeypatch.setattr(hub, "available_memory", lambda: 10)
    with pytest.raises(ResourceError, match="quantize=4"):
        hub.check_memory(files)
    with pytest.raises(ResourceError, match="memory"):
        hub.resolve_model(d)
    monkeypatch.setenv("PERSONAPLEX_SKIP_RESOURCE_CHECK", "1")
    hub.check_memory(files)
    monkeypatch.delenv("PERSONAPLEX_SKIP_RESOURCE_CHECK")
    monkeypatch.setattr(hub, "available_memory", lambda: 10 ** 12)
    hub.check_memory(files, quantize=4)
    assert hub.memory_needed(files, 4) < hub.memory_needed(files, None)
    monkeypatch.undo()
    assert hub.available_memory() > 0


# ---------------------------------------------------------------------------------------------
# local directories and file checks


def _local_dir(tmp_path, skip=()):
    d = tmp_path / "model"
    d.mkdir()
    for name, data in _model_files().items():
        if name not in skip:
            (d / name).write_bytes(data)
    return d


def test_local_directory_and_model_dir(tmp_path):
    d = _local_dir(tmp_path)
    files = hub.resolve_model(str(d), check_resources=False)
    assert files.root == d and files.voices_dir == d / "voices"
    assert (d / "voices" / "NATF0.pt").is_file()
    again = hub.resolve_model("nvidia/personaplex-7b-v1", model_dir=d, check_resources=False)
    assert again.lm == d / hub.LM_FILE


def test_local_directory_missing_file_is_named(tmp_path):
    d = _local_dir(tmp_path, skip=(hub.MIMI_FILE,))
    with pytest.raises(ModelNotFound, match=hub.MIMI_FILE):
        hub.resolve_model(d, check_resources=False)
    with pytest.raises(ModelNotFound, match="neither a local model directory"):
        hub.resolve_model("./no/such/dir/here")
    with pytest.raises(ModelNotFound, match="does not exist"):
        hub.resolve_model("x", model_dir=tmp_path / "absent")


def test_bad_engine_config(tmp_path):
    d = _local_dir(tmp_path)
    (d / hub.CONFIG_FILE).write_text("{not json")
    with pytest.raises(CorruptCheckpoint, match="engine_config.json"):
        hub.resolve_model(d, check_resources=False)


def test_check_safetensors(tmp_path):
    good = tmp_path / "g.safetensors"
    good.write_bytes(_safetensors_bytes({"a": np.zeros((3, 5), np.float32), "b": np.zeros(2, np.int64)}))
    header = hub.check_safetensors(good)
    assert header["a"]["shape"] == [3, 5]
    data = good.read_bytes()
    cases = {
        "short": (data[:5], "too short"),
        "hdr": (data[:8] + b"{", "header alone"),
        "json": (data[:8] + b"x" * (len(data) - 8), "not valid JSON"),
        "trunc": (data[:-1], "truncated"),
        "zero": (b"\0" * 16, "not plausible"),
    }
    for name, (payload, msg) in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(payload)
        with pytest.raises(CorruptCheckpoint, match=msg):
            hub.check_safetensors(p)
    # size that disagrees with dtype x shape
    n = int.from_bytes(data[:8], "little")
    h = json.loads(data[8:8 + n])
    h["a"]["shape"] = [3, 6]
    hb = json.dumps(h).encode()
    p = tmp_path / "shape.safetensors"
    p.write_bytes(len(hb).to_bytes(8, "little") + hb + data[8 + n:])
    with pytest.raises(CorruptCheckpoint, match="expected 72 bytes"):
        hub.check_safetensors(p)
    with pytest.raises(ModelNotFound):
        hub.check_safetensors(tmp_path / "absent.safetensors")


def _tgz(tmp_path, members) -> Path:
    p = tmp_path / "voices.tgz"
    with tarfile.open(p, "w:gz") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return p


def _file(name, data=b"x"):
    i = tarfile.TarInfo(name)
    i.size = len(data)
    return i, data


@pytest.mark.parametrize("member,msg", [
    (_file("../evil.pt"), r"'\.\.'"),
    (_file("voices/../../evil.pt"), r"'\.\.'"),
    (_file("/etc/evil.pt"), "absolute"),
])
def test_extract_voices_refuses_traversal(tmp_path, member, msg):
    p = _tgz(tmp_path, [_file("voices/NATF0.pt"), member])
    with pytest.raises(CorruptCheckpoint, match=msg):
        hub.extract_voices(p)
    assert not (tmp_path / "voices").exists() and not (tmp_path.parent / "evil.pt").exists()
    assert not list(tmp_path.glob(".voices-*")), "temporary directory left behind"


def test_extract_voices_refuses_links(tmp_path):
    link = tarfile.TarInfo("voices/NATM0.pt")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    p = _tgz(tmp_path, [_file("voices/NATF0.pt"), (link, None)])
    with pytest.raises(CorruptCheckpoint, match="links"):
        hub.extract_voices(p)


def test_extract_voices_truncated_and_flat(tmp_path):
    p = _tgz(tmp_path, [_file("NATF0.pt", b"a" * 5000), _file("NATF1.pt", b"b" * 5000)])
    out = hub.extract_voices(p, tmp_path / "out")
    assert sorted(x.name for x in out.iterdir()) == ["NATF0.pt", "NATF1.pt"]
    assert (out / "NATF1.pt").read_bytes() == b"b" * 5000
    data = p.read_bytes()
    bad = tmp_path / "bad" / "voices.tgz"
    bad.parent.mkdir()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpoint, match="truncated|corrupt|tar"):
        hub.extract_voices(bad)


# ---------------------------------------------------------------------------------------------
# the embedded tiny model


@pytest.fixture(scope="module")
def tiny_a(tmp_path_factory):
    return hub.ensure_tiny_model(tmp_path_factory.mktemp("tiny_a"))


def test_tiny_model_layout(tiny_a):
    import sentencepiece as spm

    from engine.models.lm import LmConfig, random_state_dict
    from engine.models.mimi import MimiConfig
    assert tiny_a.name == "tiny-v1"
    files = hub.from_directory(tiny_a, is_tiny=True)
    assert files.lm_config() == LmConfig.tiny() and files.mimi_config() == MimiConfig.tiny()
    lm_header = hub.check_safetensors(files.lm)
    sd = random_state_dict(LmConfig.tiny(), seed=0)
    assert set(lm_header) - {"__metadata__"} == set(sd)
    assert all(lm_header[k]["shape"] == list(v.shape) for k, v in sd.items())
    assert "encoder.model.0.conv.conv.weight" in hub.check_safetensors(files.mimi)
    sp = spm.SentencePieceProcessor(model_file=str(files.tokenizer))
    assert sp.get_piece_size() == LmConfig.tiny().text_card
    assert sorted(p.stem for p in files.voices_dir.glob("*.pt")) == sorted(
        __import__("engine.persona", fromlist=["VOICES"]).VOICES)
    lengths = set()
    for p in files.voices_dir.glob("*.pt"):
        v = _torchpt.load(p, bf16="bits")
        assert v["embeddings"].dtype == np.uint16  # stored as bf16, like the released voices
        n, one, one2, d = v["embeddings"].shape
        assert (one, one2, d) == (1, 1, LmConfig.tiny().dim) and 10 <= n <= 19
        assert v["cache"].shape == (1, 17, 4) and v["cache"].dtype == np.int64
        lengths.add(n)
    assert len(lengths) > 1
    readme = (tiny_a / "README.md").read_text()
    assert "random" in readme and "BABBLE" in readme


def test_tiny_model_is_deterministic_and_cached(tiny_a, tmp_path, monkeypatch):
    t0 = time.monotonic()
    again = hub.ensure_tiny_model(tiny_a.parent)
    assert again == tiny_a and time.monotonic() - t0 < 1.0
    monkeypatch.setenv("PERSONAPLEX_CACHE", str(tmp_path))
    b = hub.ensure_tiny_model()
    assert b == tmp_path / "tiny-v1"
    names = sorted(str(p.relative_to(tiny_a)) for p in tiny_a.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    for n in names:
        assert (tiny_a / n).read_bytes() == (b / n).read_bytes(), n
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dirs left behind"
    # a stale or damaged copy is rebuilt
    (b / ".build_id").write_text("old\n")
    (b / hub.LM_FILE).write_bytes(b"junk")
    hub.ensure_tiny_model()
    assert (b / hub.LM_FILE).read_bytes() == (tiny_a / hub.LM_FILE).read_bytes()
    files = hub.resolve_model("tiny")
    assert files.is_tiny and files.source == "tiny" and files.root == b


@pytest.mark.oracle
def test_tiny_voices_load_in_torch(tiny_a):
    torch = pytest.importorskip("torch")
    d = torch.load(tiny_a / "voices" / "NATM0.pt", weights_only=True)
    assert d["embeddings"].dtype == torch.bfloat16 and d["embeddings"].ndim == 4
    assert d["cache"].dtype == torch.int64 and tuple(d["cache"].shape) == (1, 17, 4)
    np.testing.assert_array_equal(d["embeddings"].float().numpy(),
                                  _torchpt.load(tiny_a / "voices" / "NATM0.pt")["embeddings"])


# ---------------------------------------------------------------------------------------------
# the converted MLX layout (aufklarer/PersonaPlex-7B-MLX-4bit / -8bit)

MLX_REPO = "aufklarer/PersonaPlex-7B-MLX-8bit"


@pytest.fixture(scope="module")
def mlx_dir(tmp_path_factory):
    from tests import swift_layout_writer as W
    base = tmp_path_factory.mktemp("mlx_hub")
    return W.convert(W.reference_dir(base / "src"), base / "mlx8", 8)


def _dir_files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def mlx_hub(fake_hub, mlx_dir):
    files = _dir_files(mlx_dir)
    fake_hub.repos[MLX_REPO] = files
    fake_hub.repos["aufklarer/no-voice"] = {k: v for k, v in files.items() if k != "voices/VARM2.safetensors"}
    fake_hub.repos["aufklarer/trunc"] = {**files, "depformer.safetensors": files["depformer.safetensors"][:-9]}
    return fake_hub


def test_mlx_repo_download_and_offline(mlx_hub, hf_env, monkeypatch):
    mlx_hub.requests.clear()
    files = _resolve(mlx_hub, MLX_REPO, hf_env)
    assert files.layout == "mlx" and files.source == MLX_REPO and hub.is_mlx_repo(MLX_REPO)
    assert {k: p.name for k, p in files.lm_files.items()} == {
        "temporal": "temporal.safetensors", "depformer": "depformer.safetensors", "embeddings": "embeddings.safetensors"}
    assert all(p.is_file() for p in files.lm_files.values()) and files.mimi.name == "mimi.safetensors"
    assert files.voice_names() == sorted(hub.VOICE_NAMES)
    assert files.voice_path("NATF2") == files.voices_dir / "NATF2.safetensors"
    assert files.mlx_config["quantization"]["bits"] == 8 and files.config["mimi"]   # the tiny codec's config
    asked = {p.split("/resolve/main/")[1] for _, p in mlx_hub.requests}
    assert asked == set(mlx_hub.repos[MLX_REPO]), "exactly the layout's files (config.json lists the voices)"
    assert str(files.root).startswith(str(hf_env))
    n = len(mlx_hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = _resolve(mlx_hub, MLX_REPO, hf_env)
    assert again.lm == files.lm and len(mlx_hub.requests) == n, "offline: the cache only"
    with pytest.raises(ModelNotFound, match=r"(?s)config\.json from aufklarer/PersonaPlex-7B-MLX-4bit.*offline"):
        _resolve(mlx_hub, "aufklarer/PersonaPlex-7B-MLX-4bit", hf_env)


def test_mlx_repo_errors(mlx_hub, hf_env):
    with pytest.raises(ModelNotFound, match=r"aufklarer/no-voice has no file voices/VARM2\.safetensors"):
        _resolve(mlx_hub, "aufklarer/no-voice", hf_env)
    with pytest.raises(CorruptCheckpoint, match=r"(?s)depformer\.safetensors is truncated.*--force-download"):
        _resolve(mlx_hub, "aufklarer/trunc", hf_env)
    with pytest.raises(ModelNotFound, match="aufklarer/PersonaPlex-7B-MLX-4bit was not found"):
        _resolve(mlx_hub, "aufklarer/PersonaPlex-7B-MLX-4bit", hf_env)


@pytest.mark.filterwarnings("ignore:Not enough free disk space")
def test_mlx_repo_disk_check(mlx_hub, hf_env, monkeypatch):
    import shutil as _sh
    real = _sh.disk_usage
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(ResourceError, match="disk space"):
        _resolve(mlx_hub, MLX_REPO, hf_env, check_resources=True)
    blobs = hf_env / "models--aufklarer--PersonaPlex-7B-MLX-8bit" / "blobs"
    assert sum(p.stat().st_size for p in blobs.iterdir()) < 10_000   # config.json only


@pytest.mark.parametrize("where", ["models/aufklarer/PersonaPlex-7B-MLX-8bit", "aufklarer_PersonaPlex-7B-MLX-8bit"])
def test_swift_demo_cache_is_used_without_network(mlx_dir, tmp_path, monkeypatch, where, hf_env):
    """A Mac that ran the Swift demo keeps the repo in the demo's own cache: used as it is."""
    import shutil as _sh

    import huggingface_hub.utils._http as hf_http
    monkeypatch.setattr(hf_http.time, "sleep", lambda s: None)  # skip the library's retry backoff
    demo = tmp_path / "caches" / "qwen3-speech" / where
    _sh.copytree(mlx_dir, demo)
    monkeypatch.setenv("QWEN3_CACHE_DIR", str(tmp_path / "caches"))
    with socket.socket() as s:   # nothing listens there: any download attempt would fail
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    files = hub.resolve_model(MLX_REPO, endpoint=dead, cache_dir=hf_env, progress=False, token=False,
                              check_resources=False)
    assert files.root == demo and files.layout == "mlx" and files.source == MLX_REPO
    (demo / "depformer.safetensors").unlink()   # incomplete: the hub is asked instead
    with pytest.raises(NetworkError):
        hub.resolve_model(MLX_REPO, endpoint=dead, cache_dir=hf_env, progress=False, token=False,
                          check_resources=False)


def test_mlx_local_directory_and_memory(mlx_dir, monkeypatch):
    files = hub.resolve_model(str(mlx_dir), check_resources=False)
    assert files.layout == "mlx" and files.root == mlx_dir
    assert hub.resolve_model("tiny", model_dir=mlx_dir, check_resources=False).layout == "mlx"
    lm_bytes = sum((mlx_dir / n).stat().st_size for n in ("temporal.safetensors", "depformer.safetensors",
                                                          "embeddings.safetensors"))
    want = lm_bytes + (mlx_dir / "mimi.safetensors").stat().st_size + 256 * 1024 * 1024
    assert hub.memory_needed(files) == hub.memory_needed(files, 4) == want   # held as stored
    monkeypatch.setattr(hub, "available_memory", lambda: want - 1)
    with pytest.raises(ResourceError, match="memory"):
        hub.resolve_model(mlx_dir)
