"""Shared fixtures for model tests.

Generic helpers (usable by any model test): `speech_like`, `snr_db`, `rel_err`, `oracle_torch`.
Mimi fixtures are prefixed `mimi_`. Everything the oracle tests need is generated here in a
temporary directory (nothing downloaded, nothing cached between runs).
"""
from __future__ import annotations

import types

import numpy as np
import pytest

import engine  # noqa: F401  (OpenBLAS for MLX before mlx is imported)


# ---------------------------------------------------------------------------------------------
# generic helpers

def speech_like(seconds: float, seed: int = 0, sr: int = 24000) -> np.ndarray:
    """Speech-like float32 mono signal: a gliding harmonic voice with syllable envelopes, short
    noise bursts (fricatives), pauses and a little background noise."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    f0 = 110 + 70 * rng.uniform() + 40 * np.sin(2 * np.pi * rng.uniform(0.3, 1.2) * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    amps = rng.uniform(0.2, 1.0, 10)
    voiced = sum(a * np.sin((h + 1) * phase) / (h + 1) for h, a in enumerate(amps))
    syl = np.clip(np.sin(2 * np.pi * rng.uniform(2.5, 4.5) * t + rng.uniform(0, 6)), 0, None)
    fric = rng.standard_normal(n) * (np.sin(2 * np.pi * 1.7 * t + rng.uniform(0, 6)) > 0.8)
    pause = (np.sin(2 * np.pi * 0.4 * t + rng.uniform(0, 6)) > -0.7).astype(float)
    sig = pause * (0.3 * syl ** 2 * voiced + 0.05 * fric) + 0.003 * rng.standard_normal(n)
    return sig.astype(np.float32)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def snr_db(test, ref) -> float:
    test, ref = np.asarray(test, np.float64), np.asarray(ref, np.float64)
    noise = np.sum((test - ref) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref ** 2) / noise))


@pytest.fixture(scope="session")
def oracle_torch():
    """torch + moshi 0.2.13 (the reference), or skip."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("moshi.models.loaders")
    torch.set_num_threads(2)
    return torch


# ---------------------------------------------------------------------------------------------
# Mimi

def mimi_reference_config(cfg) -> dict:
    """Our MimiConfig as the `mimi_config` dict that moshi's `get_mimi` takes."""
    seanet = {"channels": cfg.channels, "dimension": cfg.dimension, "causal": True,
              "n_filters": cfg.n_filters, "n_residual_layers": cfg.n_residual_layers,
              "activation": "ELU", "compress": cfg.compress, "dilation_base": cfg.dilation_base,
              "disable_norm_outer_blocks": 0, "kernel_size": cfg.kernel_size,
              "residual_kernel_size": cfg.residual_kernel_size,
              "last_kernel_size": cfg.last_kernel_size, "norm": "none", "pad_mode": "constant",
              "ratios": list(cfg.ratios), "true_skip": True}
    quant = {"dimension": cfg.quantizer_dimension, "n_q": cfg.n_q, "bins": cfg.bins,
             "input_dimension": cfg.dimension, "output_dimension": cfg.dimension}
    tr = {"d_model": cfg.d_model, "num_heads": cfg.num_heads, "num_layers": cfg.num_layers,
          "causal": True, "layer_scale": 0.01, "context": cfg.context, "conv_layout": True,
          "max_period": cfg.max_period, "gating": "none", "norm": "layer_norm",
          "positional_embedding": "rope", "dim_feedforward": cfg.dim_feedforward,
          "input_dimension": cfg.dimension, "output_dimensions": [cfg.dimension]}
    return {"sample_rate": cfg.sample_rate, "channels": cfg.channels,
            "frame_rate": cfg.frame_rate, "seanet": seanet, "quantizer": quant, "transformer": tr}


def mimi_build_reference(torch, cfg, seed: int, audio: np.ndarray, codebooks: str = "sampled",
                         sampled_levels: int = 8):
    """A random reference Mimi (moshi 0.2.13) whose codebooks are NOT degenerate.

    The stock random model has all-zero codebooks (every code identical). We fill each level,
    level by level, from the residuals of real latents (of `audio`, (B, 1, T)):
    - "sampled" (realistic, like a trained k-means codebook) for the first `sampled_levels`
      codebooks (semantic + acoustic, 8 = what PersonaPlex uses): every latent frame contributes
      its residual plus a little noise as one codeword; the other codewords sit far from the
      data (3x its spread) and are never chosen. The next level's residual uses the nearest
      *other* frame's codeword (leave-one-out), as unseen audio would. A few hundred frames
      cannot fill 32 levels this way (deep residuals stop shrinking and collapse onto a few
      codes), so deeper levels are "gaussian".
    - "gaussian": random codewords around the residual mean at 0.3x its spread. In 256
      dimensions the nearest-neighbour margins are then unrealistically narrow (near-ties):
      good for diversity, pessimistic for rounding tests.
    Codebooks are stored as embedding_sum = vectors * cluster_usage with random usages (a few
    below the 1e-5 clamp), and loaded into a fresh model (the codebook caches its embedding on
    first use, so editing a used model would be stale). Returns (model, state_dict as numpy).
    """
    from moshi.models.loaders import get_mimi

    if codebooks not in ("sampled", "gaussian"):
        raise ValueError(f"codebooks must be 'sampled' or 'gaussian', got {codebooks!r}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    ref_cfg = mimi_reference_config(cfg)
    model = get_mimi(None, mimi_config=ref_cfg, device="cpu", num_codebooks=cfg.n_q)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # Random biases / norms / layer scales: the stock init has zero biases, unit norms.
    for k, v in sd.items():
        if k.endswith(".bias") or "layer_scale" in k or (k.endswith(".weight") and "norm" in k):
            base = 1.0 if (k.endswith(".weight") and "norm" in k) else (
                0.01 if "layer_scale" in k else 0.0)
            # Small biases: large ones give the latent a DC offset that dwarfs the signal.
            sd[k] = base + (0.002 if k.endswith(".bias") else 0.02) * torch.randn_like(v)
    model.load_state_dict(sd)
    with torch.no_grad():
        lat = model._encode_to_unquantized_latent(torch.from_numpy(audio))
        for name in ("rvq_first", "rvq_rest"):
            rvq = getattr(model.quantizer, name)
            r = rvq.input_proj(lat).transpose(1, 2).reshape(-1, cfg.quantizer_dimension)
            r = r.numpy().astype(np.float64)
            n = min(len(r), cfg.bins)
            first = 0 if name == "rvq_first" else cfg.n_q_semantic
            for lvl in range(len(rvq.vq.layers)):
                mu, spread = r.mean(0), r.std(0) + 1e-12
                sampled = codebooks == "sampled" and first + lvl < sampled_levels
                if not sampled:
                    book = mu + 0.3 * spread * rng.standard_normal((cfg.bins, r.shape[1]))
                else:
                    book = mu + 3.0 * spread * rng.standard_normal((cfg.bins, r.shape[1]))
                    pick = rng.permutation(len(r))[:n]
                    slot = rng.permutation(cfg.bins)[:n]  # codeword slot of frame pick[i]
                    book[slot] = r[pick] + 0.05 * spread * rng.standard_normal((n, r.shape[1]))
                usage = rng.uniform(0.5, 2.0, cfg.bins)
                usage[rng.integers(0, cfg.bins, 8)] = 1e-7  # clamped to 1e-5 by the codec
                eff = np.maximum(usage, 1e-5)
                p = f"quantizer.{name}.vq.layers.{lvl}._codebook."
                sd[p + "embedding_sum"] = torch.from_numpy((book * eff[:, None]).astype(np.float32))
                sd[p + "cluster_usage"] = torch.from_numpy(usage.astype(np.float32))
                sd[p + "_initialized"] = torch.ones(1)
                book32 = (book * eff[:, None]).astype(np.float32) / eff[:, None].astype(np.float32)
                d = (book32.astype(np.float64) ** 2).sum(1)[None] - 2 * r @ book32.T
                if sampled:
                    d[pick, slot] = np.inf  # leave-one-out: never a frame's own codeword
                r = r - book32[d.argmin(1)]
    fresh = get_mimi(None, mimi_config=ref_cfg, device="cpu", num_codebooks=cfg.n_q)
    fresh.load_state_dict(sd)
    fresh.eval()
    return fresh, {k: v.numpy() for k, v in sd.items()}


def _mimi_fixture(torch, tmp_path_factory, cfg, seed, name, codebooks, n_audio, seconds):
    from safetensors.numpy import save_file

    audio = np.stack([speech_like(seconds, seed=100 + i) for i in range(n_audio)])[:, None]
    model, sd = mimi_build_reference(torch, cfg, seed, audio, codebooks)
    path = tmp_path_factory.mktemp(name) / "tokenizer-e351c8d8-checkpoint125.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))
    return types.SimpleNamespace(model=model, path=path, config=cfg, state_dict=sd)


@pytest.fixture(scope="session")
def mimi_ref_tiny(oracle_torch, tmp_path_factory):
    """Reference Mimi at MimiConfig.tiny() sizes (fast), saved as safetensors."""
    from engine.models.mimi import MimiConfig
    return _mimi_fixture(oracle_torch, tmp_path_factory, MimiConfig.tiny(), 1, "mimi_tiny",
                         "gaussian", 2, 3.0)


@pytest.fixture(scope="session")
def mimi_ref_7b(oracle_torch, tmp_path_factory):
    """Reference Mimi at the released sizes (fp32, ~385 MB in a temp dir; ~20-40 s to build),
    the first 8 codebooks sampled from the latents of 4 x 5 s of audio (250 codewords each)."""
    from engine.models.mimi import MimiConfig
    return _mimi_fixture(oracle_torch, tmp_path_factory, MimiConfig.personaplex(), 2, "mimi_7b",
                         "sampled", 4, 5.0)


@pytest.fixture(scope="session")
def mimi_test_audio():
    """4 s of speech-like audio (B=1) not used to build the codebooks."""
    return speech_like(4.0, seed=7)[None, None]
