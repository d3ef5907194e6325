"""Find the model's files: the embedded tiny model, a local directory, or a Hugging Face repository.

`resolve_model(model)` returns a `ModelFiles` with the paths of the LM and Mimi safetensors, the
SentencePiece model, the voices directory and the optional `engine_config.json`, after checking them:

- "tiny": generated once into the local cache (`engine.tiny.ensure_tiny_model`), no download.
- a local directory (or `model_dir=`): used as is; a missing file is named in `ModelNotFound`.
- a repo id (default `nvidia/personaplex-7b-v1`): `huggingface_hub.hf_hub_download` per file, with
  its progress bars and cache; `HF_HUB_OFFLINE=1` (or `offline=True`) uses the cache only.

Two layouts (engine/filenames.py): the released repository's ("reference": `model.safetensors`,
`voices.tgz`) and the Swift demo's converted MLX checkpoints ("mlx": `temporal.safetensors`,
`depformer.safetensors`, `embeddings.safetensors`, `mimi.safetensors`, `config.json`,
`voices/<NAME>.safetensors`; read by engine/models/mlx_layout.py). A repo id under `aufklarer/`
(`aufklarer/PersonaPlex-7B-MLX-8bit`, `-4bit`) or a directory holding `temporal.safetensors` is the
MLX layout. For those repos a complete copy in the Swift demo's own download cache
(`~/Library/Caches/qwen3-speech/models/<repo>`, or under `$QWEN3_CACHE_DIR`) is used without a
download.

Hub failures become actionable engine errors (`GatedModelError`, `NetworkError`, `ModelNotFound`),
safetensors files are checked (header + every tensor's byte range vs the file size) before anything
loads them (`CorruptCheckpoint`), and free disk / memory are compared with what is needed
(`ResourceError`; set PERSONAPLEX_SKIP_RESOURCE_CHECK=1 to skip). `voices.tgz` is unpacked safely
(regular files only, no absolute paths, no `..`, no links) next to the downloaded archive.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .filenames import (
    CONFIG_FILE,
    DEFAULT_REPO,
    LM_FILE,
    MIMI_FILE,
    MLX_CONFIG_FILE,
    MLX_DEPFORMER_FILE,
    MLX_EMBEDDINGS_FILE,
    MLX_MIMI_FILE,
    MLX_OWNER,
    MLX_REPOS,
    MLX_TEMPORAL_FILE,
    MLX_VOICE_SUFFIX,
    TOKENIZER_FILE,
    VOICE_NAMES,
    VOICES_ARCHIVE,
    VOICES_DIR,
)
from .tiny import ensure_tiny_model
from .errors import (
    CorruptCheckpoint,
    GatedModelError,
    ModelNotFound,
    NetworkError,
    ResourceError,
)

__all__ = [
    "DEFAULT_REPO", "LM_FILE", "MIMI_FILE", "TOKENIZER_FILE", "VOICES_ARCHIVE", "VOICES_DIR",
    "CONFIG_FILE", "MLX_REPOS", "ModelFiles", "resolve_model", "ensure_tiny_model", "check_safetensors",
    "extract_voices", "available_memory", "check_memory", "check_disk", "is_mlx_repo",
]


# Sizes of the released files (bytes, rounded up), used for the disk check when the hub's HEAD
# response gives no size. The MLX files' are those of the 8-bit conversion (the larger one).
_RELEASED_SIZES = {LM_FILE: 16_800_000_000, MIMI_FILE: 390_000_000, TOKENIZER_FILE: 600_000,
                   VOICES_ARCHIVE: 80_000_000, MLX_TEMPORAL_FILE: 7_000_000_000,
                   MLX_DEPFORMER_FILE: 1_400_000_000, MLX_EMBEDDINGS_FILE: 1_000_000_000,
                   MLX_MIMI_FILE: 390_000_000, MLX_CONFIG_FILE: 10_000}
_MLX_VOICE_SIZE = 1_000_000
_MLX_REQUIRED = (MLX_TEMPORAL_FILE, MLX_DEPFORMER_FILE, MLX_EMBEDDINGS_FILE, MLX_MIMI_FILE, TOKENIZER_FILE,
                 MLX_CONFIG_FILE)
_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
_MAX_HEADER = 100 * 1024 * 1024
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# voices.tgz bounds: the release holds 18 files of ~0.4 MB each.
_MAX_VOICE_FILE = 512 * 1024 * 1024
_MAX_VOICE_TOTAL = 4 * 1024 * 1024 * 1024
_SKIP_ENV = "PERSONAPLEX_SKIP_RESOURCE_CHECK"


@dataclass(frozen=True)
class ModelFiles:
    """Checked paths of one model. `config` is the parsed engine_config.json ({"lm": {...},
    "mimi": {...}}) or None for the released 7B model (whose configs are the defaults); for the
    MLX layout its "lm" part comes from the converter's config.json (kept whole in `mlx_config`).

    layout "reference": `lm` is model.safetensors. layout "mlx": `lm` is temporal.safetensors and
    `lm_files` names the three LM files; voices are `<NAME>.safetensors` instead of `<NAME>.pt`."""

    lm: Path
    mimi: Path
    tokenizer: Path
    voices_dir: Path | None
    config: dict | None = field(default=None, repr=False)
    source: str = ""          # "tiny", the repo id, or the directory given
    root: Path | None = None  # directory holding the files (snapshot dir for a repo)
    is_tiny: bool = False
    layout: str = "reference"
    mlx_config: dict | None = field(default=None, repr=False)

    @property
    def lm_files(self) -> dict[str, Path]:
        """The LM's files by part: {"model": ...} or {"temporal", "depformer", "embeddings"}."""
        if self.layout == "mlx":
            from .models.mlx_layout import PARTS
            return {part: self.lm.parent / name for part, name in PARTS.items()}
        return {"model": self.lm}

    @property
    def voice_suffix(self) -> str:
        return MLX_VOICE_SUFFIX if self.layout == "mlx" else ".pt"

    def lm_config(self):
        """`LmConfig` for this model (from engine_config.json, else the 7B defaults)."""
        from .models.lm import LmConfig
        if self.config and "lm" in self.config:
            return LmConfig.from_dict(self.config["lm"])
        return LmConfig.personaplex()

    def mimi_config(self):
        """`MimiConfig` for this model (from engine_config.json, else the released codec)."""
        from .models.mimi import MimiConfig
        if self.config and "mimi" in self.config:
            return MimiConfig.from_dict(self.config["mimi"])
        return MimiConfig.personaplex()

    def voice_path(self, name: str) -> Path | None:
        if self.voices_dir is None:
            return None
        p = self.voices_dir / f"{name}{self.voice_suffix}"
        return p if p.is_file() else None

    def voice_names(self) -> list[str]:
        """Names of the voice files in `voices_dir` (sorted)."""
        if self.voices_dir is None:
            return []
        return sorted(p.name[: -len(self.voice_suffix)] for p in Path(self.voices_dir).glob(f"*{self.voice_suffix}"))


# ----------------------------------------------------------------------------------------------
# File checks


def check_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """Validate a safetensors file without loading it: 8-byte little-endian header length, JSON
    header, and every tensor's [start, end) byte range inside the file and matching its dtype and
    shape. Returns the header dict (tensor name -> {dtype, shape, data_offsets}).

    Raises:
        ModelNotFound: the file does not exist.
        CorruptCheckpoint: truncated or malformed, naming the file, the sizes and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelNotFound(f"checkpoint file {path} does not exist")
    size = path.stat().st_size
    fix = (f"The file is probably a truncated or interrupted download: delete {path} (for the hub "
           "cache, the file it links to as well) and download it again.")
    if size < 8:
        raise CorruptCheckpoint(f"{path} is {size} bytes, too short for a safetensors header. {fix}")
    with open(path, "rb") as fp:
        (n,) = struct.unpack("<Q", fp.read(8))
        if n == 0 or n > _MAX_HEADER:
            raise CorruptCheckpoint(f"{path}: header length {n} is not plausible; not a safetensors file. {fix}")
        if 8 + n > size:
            raise CorruptCheckpoint(f"{path} is {size} bytes but its header alone needs {8 + n}. {fix}")
        raw = fp.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpoint(f"{path}: safetensors header is not valid JSON ({exc}). {fix}") from None
    if not isinstance(header, dict):
        raise CorruptCheckpoint(f"{path}: safetensors header is not a JSON object. {fix}")
    data_start = 8 + n
    need = data_start
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            count = 1
            for s in shape:
                count *= int(s)
            nbytes = count * _SAFETENSORS_DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpoint(f"{path}: tensor {name!r} has a malformed header entry {info!r}. {fix}") from None
        if not (0 <= begin <= end) or end - begin != nbytes:
            raise CorruptCheckpoint(
                f"{path}: tensor {name!r} ({dtype} {shape}) spans bytes [{begin}, {end}), expected "
                f"{nbytes} bytes. {fix}")
        need = max(need, data_start + end)
        if data_start + end > size:
            raise CorruptCheckpoint(
                f"{path} is truncated: it is {size} bytes, but tensor {name!r} ends at byte "
                f"{data_start + end} (the header describes {_fmt_bytes(_header_end(header, data_start))}). {fix}")
    return header


def _header_end(header: dict, data_start: int) -> int:
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return data_start + (max(ends) if ends else 0)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _read_config(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpoint(f"{path} is not valid JSON ({exc}); restore or delete it") from None
    if not isinstance(config, dict) or not all(isinstance(config.get(k, {}), dict) for k in ("lm", "mimi")):
        raise CorruptCheckpoint(f"{path} must hold a JSON object {{\"lm\": {{...}}, \"mimi\": {{...}}}}")
    return config


# ----------------------------------------------------------------------------------------------
# Resources


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (psutil, /proc/meminfo, or sysconf); None if unknown."""
    try:
        import psutil  # optional
        return int(psutil.virtual_memory().available)
    except Exception:
        pass
    try:
        with open("/proc/meminfo") as fp:
            for line in fp:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _skip_checks() -> bool:
    return os.environ.get(_SKIP_ENV, "").lower() in ("1", "true", "yes")


def check_disk(path: str | os.PathLike, need: int, what: str = "the model files") -> None:
    """Raise ResourceError if the filesystem holding `path` has less than `need` bytes free."""
    if need <= 0 or _skip_checks():
        return
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    free = shutil.disk_usage(p).free
    if free < need:
        raise ResourceError(
            f"not enough disk space for {what}: need {_fmt_bytes(need)}, {_fmt_bytes(free)} free on "
            f"the filesystem of {p}. Free some space, or point HF_HOME / HF_HUB_CACHE (or cache_dir) "
            f"at a larger disk, or use --model-dir with files you already have. ({_SKIP_ENV}=1 skips this check.)")


def memory_needed(files: ModelFiles, quantize: int | None = None) -> int:
    """Estimated bytes of memory to hold the model's weights (LM at bf16 or `quantize` bits + Mimi
    fp32). The MLX layout's LM is held as stored (quantized, floats at 2 bytes): its file sizes."""
    lm = sum(p.stat().st_size for p in files.lm_files.values())
    quantized = files.layout == "mlx" and bool((files.mlx_config or {}).get("quantization"))
    if quantize and not quantized:
        lm = int(lm * (quantize + 1) / 16)  # +1 bit/weight for per-group scales and biases
    return lm + files.mimi.stat().st_size + 256 * 1024 * 1024


def check_memory(files: ModelFiles, quantize: int | None = None) -> None:
    """Raise ResourceError if less memory is available than the model needs."""
    if _skip_checks():
        return
    need = memory_needed(files, quantize)
    have = available_memory()
    if have is not None and have < need:
        hint = " Use quantize=4 (about 4.8 GB) or 8." if not quantize or quantize > 4 else ""
        raise ResourceError(
            f"not enough memory to load {files.source or files.lm}: needs about {_fmt_bytes(need)}, "
            f"{_fmt_bytes(have)} available.{hint} Close other programs, or use a machine with more memory. "
            f"({_SKIP_ENV}=1 skips this check.)")


# ----------------------------------------------------------------------------------------------
# voices.tgz


def extract_voices(archive: str | os.PathLike, dest: str | os.PathLike | None = None) -> Path:
    """Safely unpack `voices.tgz` into `dest` (default: a `voices/` directory next to the archive).

    Only regular files and directories are accepted; absolute names, `..`, links and devices raise
    CorruptCheckpoint. A top-level `voices/` directory in the archive is stripped. Unpacks into a
    temporary sibling first and renames it, so a half-extracted directory is never used. Returns dest.
    """
    archive = Path(archive)
    dest = Path(dest) if dest is not None else archive.resolve().parent / VOICES_DIR
    if dest.is_dir() and any(dest.glob("*.pt")):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".voices-", dir=dest.parent))
    try:
        try:
            tf = tarfile.open(archive, "r:*")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise CorruptCheckpoint(f"{archive} is not a readable tar archive ({exc}); delete it and download it again") from None
        total = 0
        with tf:
            try:
                members = tf.getmembers()
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise CorruptCheckpoint(f"{archive} is truncated or corrupt ({exc}); delete it and download it again") from None
            for m in members:
                rel = _safe_member_path(archive, m)
                if rel is None:
                    continue
                target = tmp.joinpath(*rel)
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                if m.size > _MAX_VOICE_FILE or total + m.size > _MAX_VOICE_TOTAL:
                    raise CorruptCheckpoint(f"{archive}: member {m.name!r} is implausibly large ({m.size} bytes)")
                total += m.size
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(m)
                try:
                    with src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
                except (tarfile.TarError, EOFError, OSError) as exc:
                    raise CorruptCheckpoint(f"{archive} is truncated at {m.name!r} ({exc}); delete it and download it again") from None
        if not any(tmp.glob("*.pt")):
            raise CorruptCheckpoint(f"{archive} holds no .pt voice files")
        try:
            if dest.exists() and not any(dest.iterdir()):
                dest.rmdir()
            os.replace(tmp, dest)
        except OSError:
            if not (dest.is_dir() and any(dest.glob("*.pt"))):  # lost a race: keep the winner's copy
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _safe_member_path(archive: Path, m: tarfile.TarInfo) -> tuple[str, ...] | None:
    name = m.name.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise CorruptCheckpoint(f"{archive}: refusing absolute path {m.name!r} in the archive")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise CorruptCheckpoint(f"{archive}: refusing path with '..' {m.name!r} in the archive")
    if not (m.isfile() or m.isdir()):
        raise CorruptCheckpoint(f"{archive}: refusing {m.name!r}: only regular files and directories "
                                "are allowed (no links or devices)")
    if parts and parts[0] == VOICES_DIR:
        parts = parts[1:]
    if not parts or parts[-1].startswith("._"):  # the top dir itself, macOS resource forks
        return None
    return tuple(parts)


# ----------------------------------------------------------------------------------------------
# Resolution


def _env_offline() -> bool:
    from huggingface_hub import constants
    v = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if v is not None:
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(constants.HF_HUB_OFFLINE)


def from_directory(root: str | os.PathLike, source: str | None = None, *, is_tiny: bool = False) -> ModelFiles:
    """`ModelFiles` for a local directory holding the model files (checked). A directory with
    `temporal.safetensors` is the converted MLX layout."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ModelNotFound(f"model directory {root} does not exist (or is not a directory)")
    if (root / MLX_TEMPORAL_FILE).is_file():
        return _mlx_directory(root, source or str(root))
    required = (LM_FILE, MIMI_FILE, TOKENIZER_FILE)
    missing = [name for name in required if not (root / name).is_file()]
    voices = _local_voices(root)
    if missing:
        raise ModelNotFound(
            f"model directory {root} lacks {', '.join(missing)}. It must hold {', '.join(required)} and "
            f"{VOICES_DIR}/ (or {VOICES_ARCHIVE}), as in https://huggingface.co/{DEFAULT_REPO}.")
    check_safetensors(root / LM_FILE)
    check_safetensors(root / MIMI_FILE)
    return ModelFiles(lm=root / LM_FILE, mimi=root / MIMI_FILE, tokenizer=root / TOKENIZER_FILE,
                      voices_dir=voices, config=_read_config(root / CONFIG_FILE),
                      source=source or str(root), root=root, is_tiny=is_tiny)


def _mlx_directory(root: Path, source: str) -> ModelFiles:
    from .models.mlx_layout import read_config

    missing = [n for n in _MLX_REQUIRED if not (root / n).is_file()]
    if missing:
        raise ModelNotFound(
            f"model directory {root} holds {MLX_TEMPORAL_FILE}, so it is a converted MLX model, but it "
            f"lacks {', '.join(missing)}. It must hold {', '.join(_MLX_REQUIRED)} and {VOICES_DIR}/<NAME>"
            f"{MLX_VOICE_SUFFIX}, as in https://huggingface.co/{MLX_REPOS[0]}.")
    for name in (MLX_TEMPORAL_FILE, MLX_DEPFORMER_FILE, MLX_EMBEDDINGS_FILE, MLX_MIMI_FILE):
        check_safetensors(root / name)
    return _mlx_files(root, source, read_config(root / MLX_CONFIG_FILE))


def _local_voices(root: Path) -> Path | None:
    d = root / VOICES_DIR
    if d.is_dir() and any(d.glob("*.pt")):
        return d
    if (root / VOICES_ARCHIVE).is_file():
        try:
            return extract_voices(root / VOICES_ARCHIVE, d)
        except PermissionError:
            cache = _engine_cache() / "voices" / re.sub(r"[^A-Za-z0-9_.-]", "_", str(root.resolve()))
            return extract_voices(root / VOICES_ARCHIVE, cache)
    return None


def _engine_cache() -> Path:
    return Path(os.environ.get("PERSONAPLEX_CACHE") or Path.home() / ".cache" / "personaplex-engine")


def resolve_model(model: str | os.PathLike = DEFAULT_REPO, model_dir: str | os.PathLike | None = None,
                  offline: bool | None = None, progress: bool = True, *, revision: str | None = None,
                  cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
                  endpoint: str | None = None, quantize: int | None = None,
                  check_resources: bool = True, force_download: bool = False) -> ModelFiles:
    """Locate (downloading if needed) and check the files of a model.

    Args:
        model: "tiny", a local directory, or a Hugging Face repo id ("owner/name").
        model_dir: a local directory with the model files; when given it is used instead of `model`.
        offline: use only the local hub cache; None follows HF_HUB_OFFLINE.
        progress: show huggingface_hub's download progress bars.
        revision, cache_dir, token, endpoint: passed to `hf_hub_download`.
        quantize: bits the LM will be quantized to (4, 8 or None), for the memory estimate.
        check_resources: compare free disk (before downloading) and memory with what is needed.
        force_download: download the hub files again even if cached (repairs a corrupt cache).

    Raises:
        ModelNotFound, GatedModelError, NetworkError, CorruptCheckpoint, ResourceError.
    """
    if model_dir is not None:
        files = from_directory(model_dir, source=str(model_dir))
    elif str(model) == "tiny":
        files = from_directory(ensure_tiny_model(), source="tiny", is_tiny=True)
    else:
        path = Path(model).expanduser()
        if path.is_dir():
            files = from_directory(path, source=str(model))
        elif path.exists():
            raise ModelNotFound(f"model path {path} is a file; pass the directory that holds {LM_FILE} and the other files")
        elif isinstance(model, os.PathLike) or not _REPO_ID.match(str(model)):
            raise ModelNotFound(f"{model!s} is neither a local model directory nor a Hugging Face repo id "
                                f"(owner/name, e.g. {DEFAULT_REPO}), nor 'tiny'")
        else:
            files = _from_hub(str(model), offline=_env_offline() if offline is None else offline,
                              progress=progress, revision=revision, cache_dir=cache_dir, token=token,
                              endpoint=endpoint, check_resources=check_resources,
                              force_download=force_download)
    if check_resources and not files.is_tiny:
        check_memory(files, quantize)
    return files


def is_mlx_repo(repo: str) -> bool:
    """Whether a repo id names a converted MLX checkpoint (the Swift demo's layout)."""
    return str(repo).split("/", 1)[0].lower() == MLX_OWNER


class _Downloader:
    """`hf_hub_download` of one repo's files, with the engine's error mapping and progress setting."""

    def __init__(self, repo, *, offline, progress, revision, cache_dir, token, endpoint, force_download):
        self.repo, self.offline, self.revision = repo, offline, revision
        self.cache_dir, self.token, self.endpoint = cache_dir, token, endpoint
        self.force_download = force_download
        self.ctx = dict(repo=repo, offline=offline, endpoint=endpoint, token=token, cache_dir=cache_dir)
        # tqdm_class only when silencing (keeps older huggingface_hub versions working by default)
        self.quiet = {} if progress else {"tqdm_class": _silent_tqdm()}

    def check_space(self, names: list[str]) -> None:
        if not self.offline:
            _check_download_space(self.repo, names, revision=self.revision, cache_dir=self.cache_dir,
                                  token=self.token, endpoint=self.endpoint, ctx=self.ctx,
                                  force_download=self.force_download)

    def get(self, name: str, optional: bool = False) -> Path | None:
        import huggingface_hub as hh
        try:
            return Path(hh.hf_hub_download(
                self.repo, name, revision=self.revision, cache_dir=self.cache_dir, token=self.token,
                local_files_only=self.offline, endpoint=self.endpoint,
                force_download=self.force_download and not self.offline, **self.quiet))
        except Exception as exc:  # mapped to engine errors; anything unknown is re-raised
            mapped = _map_hub_error(exc, name, **self.ctx)
            if optional and isinstance(mapped, ModelNotFound):
                return None
            raise mapped from exc

    def check(self, path: Path, name: str) -> None:
        try:
            check_safetensors(path)
        except CorruptCheckpoint as exc:
            raise CorruptCheckpoint(f"{exc} To fetch it again: `hf download {self.repo} {name} --force-download`"
                                    f" (or resolve_model(..., force_download=True)).") from None


def _from_hub(repo: str, *, offline: bool, progress: bool, revision, cache_dir, token, endpoint,
              check_resources: bool, force_download: bool = False) -> ModelFiles:
    dl = _Downloader(repo, offline=offline, progress=progress, revision=revision, cache_dir=cache_dir,
                     token=token, endpoint=endpoint, force_download=force_download)
    if is_mlx_repo(repo):
        return _from_hub_mlx(dl, check_resources)
    wanted = [LM_FILE, MIMI_FILE, TOKENIZER_FILE, VOICES_ARCHIVE]
    if check_resources:
        dl.check_space(wanted)
    paths = {name: dl.get(name) for name in wanted}
    config_path = None
    if repo != DEFAULT_REPO:  # our own / converted repos may carry non-default configs
        config_path = dl.get(CONFIG_FILE, optional=True)
    for name in (LM_FILE, MIMI_FILE):
        dl.check(paths[name], name)
    voices = extract_voices(paths[VOICES_ARCHIVE])
    root = paths[LM_FILE].parent
    return ModelFiles(lm=paths[LM_FILE], mimi=paths[MIMI_FILE], tokenizer=paths[TOKENIZER_FILE],
                      voices_dir=voices, config=_read_config(config_path) if config_path else None,
                      source=repo, root=root)


def _from_hub_mlx(dl: _Downloader, check_resources: bool) -> ModelFiles:
    """A converted MLX repo: the Swift demo's complete copy if there is one, else the hub's files
    (config.json first: it lists the voices)."""
    from .models.mlx_layout import read_config, voice_names

    if not dl.force_download:
        local = _swift_demo_copy(dl.repo)
        if local is not None:
            return local
    config_path = dl.get(MLX_CONFIG_FILE)
    raw = read_config(config_path)
    voices = [f"{VOICES_DIR}/{n}{MLX_VOICE_SUFFIX}" for n in (voice_names(raw) or VOICE_NAMES)]
    wanted = [MLX_TEMPORAL_FILE, MLX_DEPFORMER_FILE, MLX_EMBEDDINGS_FILE, MLX_MIMI_FILE, TOKENIZER_FILE]
    if check_resources:
        dl.check_space(wanted + voices)
    paths = {name: dl.get(name) for name in wanted + voices}
    dl.get(CONFIG_FILE, optional=True)   # ours, next to config.json: only a non-released codec needs it
    for name in (MLX_TEMPORAL_FILE, MLX_DEPFORMER_FILE, MLX_EMBEDDINGS_FILE, MLX_MIMI_FILE):
        dl.check(paths[name], name)
    return _mlx_files(config_path.parent, dl.repo, raw)


def _swift_demo_roots() -> list[Path]:
    """Where the Swift demo (swift-transformers' HubApi) keeps its downloads: `qwen3-speech` under
    $QWEN3_CACHE_DIR (or the legacy $QWEN3_ASR_CACHE_DIR), else under the user's caches directory."""
    for var in ("QWEN3_CACHE_DIR", "QWEN3_ASR_CACHE_DIR"):
        v = os.environ.get(var, "").strip()
        if v:
            return [Path(v).expanduser() / "qwen3-speech"]
    home = Path.home()
    bases = [home / "Library" / "Caches", Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache")]
    return [b / "qwen3-speech" for b in bases]


def _swift_demo_copy(repo: str) -> ModelFiles | None:
    """The demo's copy of `repo` when it is complete and intact (`models/<owner>/<name>/`, or the
    older flat `<owner>_<name>/`), else None."""
    flat = re.sub(r"[^A-Za-z0-9._-]", "_", repo.replace("/", "_")).strip("._")
    for base in _swift_demo_roots():
        for d in (base / "models" / repo, base / flat):
            if not all((d / n).is_file() for n in _MLX_REQUIRED):
                continue
            try:
                return from_directory(d, source=repo)
            except (ModelNotFound, CorruptCheckpoint):
                continue   # incomplete or damaged: download into the Hugging Face cache instead
    return None


def _mlx_files(root: Path, source: str, raw: dict) -> ModelFiles:
    """`ModelFiles` of a checked MLX-layout directory (`raw`: its parsed config.json)."""
    from .models.mlx_layout import lm_config_dict

    config = {"lm": lm_config_dict(raw)}
    ours = _read_config(root / CONFIG_FILE)   # optional: the codec config of a non-released Mimi
    if ours and "mimi" in ours:
        config["mimi"] = ours["mimi"]
    voices = root / VOICES_DIR
    return ModelFiles(lm=root / MLX_TEMPORAL_FILE, mimi=root / MLX_MIMI_FILE, tokenizer=root / TOKENIZER_FILE,
                      voices_dir=voices if voices.is_dir() else None, config=config, source=source,
                      root=root, layout="mlx", mlx_config=raw)


def _silent_tqdm():
    from tqdm.auto import tqdm

    class _Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return _Silent


def _check_download_space(repo, wanted, *, revision, cache_dir, token, endpoint, ctx,
                          force_download=False) -> None:
    import huggingface_hub as hh
    from huggingface_hub import constants

    need = 0
    for name in wanted:
        cached = hh.try_to_load_from_cache(repo, name, cache_dir=cache_dir, revision=revision)
        if isinstance(cached, str) and not force_download and os.path.exists(cached):
            continue
        try:
            url = hh.hf_hub_url(repo, name, revision=revision, endpoint=endpoint)
            meta = hh.get_hf_file_metadata(url, token=token, endpoint=endpoint)
            size = meta.size
        except Exception as exc:
            raise _map_hub_error(exc, name, **ctx) from exc
        if size is None:
            size = _RELEASED_SIZES.get(name, _MLX_VOICE_SIZE if name.startswith(f"{VOICES_DIR}/") else 0)
        need += size
    if need:
        target = Path(cache_dir) if cache_dir else Path(constants.HF_HUB_CACHE)
        # the voices archive is unpacked next to itself: count it twice
        check_disk(target, int(need * 1.02) + 64 * 1024 * 1024, f"downloading {repo}")


def _map_hub_error(exc: BaseException, filename: str, *, repo: str, offline: bool, endpoint=None,
                   token=None, cache_dir=None, default: str = DEFAULT_REPO) -> Exception:
    """Turn a huggingface_hub / network exception into an actionable engine error. `default`: the
    repository the caller would use by default (named in the "not found" hints)."""
    from huggingface_hub import errors as he
    from huggingface_hub import constants

    page = f"{(endpoint or constants.ENDPOINT).rstrip('/')}/{repo}"
    where = f"{filename} from {repo}"
    if isinstance(exc, (CorruptCheckpoint, ResourceError, ModelNotFound, GatedModelError, NetworkError)):
        return exc
    has_token = bool(token) if token not in (None, True) else bool(_get_token())
    login = ("set HF_TOKEN=<your token> (https://huggingface.co/settings/tokens) or run `hf auth login`")
    if isinstance(exc, he.GatedRepoError) or (isinstance(exc, he.HfHubHTTPError)
                                              and _status(exc) in (401, 403)
                                              and not isinstance(exc, he.RepositoryNotFoundError)):
        if has_token:
            msg = (f"cannot download {where}: the repository is gated and your token has no access. "
                   f"Open {page} while logged in, accept the license, and make sure the token you use "
                   f"({_token_source(token)}) "
                   "belongs to that account and has read access.")
        else:
            msg = (f"cannot download {where}: the repository is gated and no Hugging Face token was found. "
                   f"Open {page}, accept the license, then {login}.")
        return GatedModelError(msg)
    if isinstance(exc, he.RepositoryNotFoundError):
        hint = "" if has_token else f" If it is private or gated, {login}."
        return ModelNotFound(f"repository {repo} was not found on {endpoint or constants.ENDPOINT}: check "
                             f"the name (default {default}).{hint}")
    if isinstance(exc, he.RevisionNotFoundError):
        return ModelNotFound(f"{repo} has no such revision: {exc}")
    if isinstance(exc, he.LocalEntryNotFoundError) or isinstance(exc, he.OfflineModeIsEnabled):
        if offline or isinstance(exc, he.OfflineModeIsEnabled):
            return ModelNotFound(
                f"{where} is not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE). "
                f"Run once online to fill the cache (cache: {cache_dir or constants.HF_HUB_CACHE}), unset "
                "HF_HUB_OFFLINE, or pass --model-dir DIR with the files.")
        return NetworkError(
            f"cannot reach the Hugging Face hub ({endpoint or constants.ENDPOINT}) to download {where}, and "
            f"it is not in the cache: check your connection / proxy (HTTPS_PROXY), or set HF_HUB_OFFLINE=1 "
            f"with a filled cache, or pass --model-dir DIR with the files. ({_cause_text(exc)})")
    if isinstance(exc, he.EntryNotFoundError):
        if default != DEFAULT_REPO:      # another kind of model (the speech recognizer)
            return ModelNotFound(f"{repo} has no file {filename}: is this the right kind of model repository "
                                 f"(like {default})?")
        hint = ""
        if filename == LM_FILE:
            hint = (f" A converted MLX checkpoint (the Swift demo's layout, {MLX_TEMPORAL_FILE} ...) is read from "
                    f"repos under {MLX_OWNER}/ or from a local directory: download it (`hf download {repo} "
                    "--local-dir DIR`) and pass DIR.")
        return ModelNotFound(f"{repo} has no file {filename}: is this a PersonaPlex model repository "
                             f"(like {DEFAULT_REPO} or {MLX_REPOS[0]})?{hint}")
    if isinstance(exc, he.HfHubHTTPError):
        status = _status(exc)
        if status is not None and (status >= 500 or status == 429):
            return NetworkError(f"the Hugging Face hub answered HTTP {status} for {where}; retry later, or "
                                "set HF_HUB_OFFLINE=1 with a filled cache, or pass --model-dir DIR.")
        return NetworkError(f"downloading {where} failed: {exc}")
    if isinstance(exc, OSError) and getattr(exc, "errno", None) == 28:
        return ResourceError(f"the disk filled up while downloading {where}: free some space, or set "
                             "HF_HUB_CACHE to a larger disk, then retry (the download resumes).")
    if _is_connection_error(exc):
        return NetworkError(
            f"cannot reach the Hugging Face hub ({endpoint or constants.ENDPOINT}) to download {where}: "
            "check your connection / proxy, or set HF_HUB_OFFLINE=1 with a filled cache, or pass "
            f"--model-dir DIR. ({exc})")
    return exc if isinstance(exc, Exception) else RuntimeError(str(exc))


def _token_source(token) -> str:
    if isinstance(token, str):
        return "the token passed in"
    return "HF_TOKEN" if os.environ.get("HF_TOKEN") else "the one saved by `hf auth login`"


def _status(exc) -> int | None:
    resp = getattr(exc, "response", None)
    return getattr(resp, "status_code", None)


def _get_token():
    try:
        from huggingface_hub import get_token
        return get_token()
    except Exception:
        return None


def _cause_text(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    return f"{type(cause).__name__}: {cause}" if cause else str(exc)


def _is_connection_error(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        mod = type(exc).__module__ or ""
        if mod.startswith(("httpx", "httpcore", "requests", "urllib3")) and any(
                k in type(exc).__name__ for k in ("Connect", "Timeout", "Network", "Proxy", "Transport")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
