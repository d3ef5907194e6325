"""The reference network (PyPI moshi==0.2.13 `LMModel`, torch CPU) built from an `LmConfig`.

Weights come from `engine.models.lm.random_state_dict` (PersonaPlex key names); the reference's own
load hook maps the packed `in_proj_weight` onto its per-step modules, so both sides read the same
file content. Import only where torch + moshi exist (tests skip otherwise).
"""
from __future__ import annotations

import os

import numpy as np

# moshi wraps some functions in torch.compile at import time unless this is set; on the CPU that
# costs tens of seconds of compilation for no gain.
os.environ.setdefault("NO_TORCH_COMPILE", "1")


def have_moshi() -> bool:
    try:
        import moshi.models.lm  # noqa: F401
        import torch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "no oracle"
        return False
    return True


def reference_kwargs(config) -> dict:
    """LmConfig -> keyword arguments of moshi.models.lm.LMModel."""
    d = config.to_dict()
    d["layer_scale"] = None
    d["depformer_layer_scale"] = None
    return d


def build_reference(config, state_dict: dict):
    """A float32 eval-mode `LMModel` holding `state_dict` (numpy arrays, reference key names)."""
    import torch
    from moshi.models.lm import LMModel

    torch.manual_seed(0)
    model = LMModel(**reference_kwargs(config), device="cpu", dtype=torch.float32)
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"reference load: missing {missing}, unexpected {unexpected}")
    return model.eval()


def save_safetensors(state_dict: dict, path) -> None:
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(path))


def reference_logits(model, tokens: np.ndarray, dep_inputs: np.ndarray):
    """Teacher-forced streaming run of the reference.

    tokens (B, K, T): temporal inputs per step; dep_inputs (B, dep_q, T): the token fed to depformer
    step s at time t (text token for s=0). Returns text logits (B, T, text_card) and audio logits
    (B, dep_q, T, card), float32 numpy.
    """
    import torch

    B, K, T = tokens.shape
    text, audio = [], []
    with torch.no_grad(), model.streaming(B):
        for t in range(T):
            seq = torch.from_numpy(tokens[:, :, t:t + 1].astype(np.int64))
            h, tl = model.forward_text(seq)
            text.append(tl[:, 0, 0].float().numpy())
            per = []
            with model.depformer.streaming(B):
                for s in range(model.dep_q):
                    prev = torch.from_numpy(dep_inputs[:, s, t:t + 1, None].astype(np.int64))
                    lg = model.forward_depformer(s, prev, h)
                    per.append(lg[:, 0, 0].float().numpy())
            audio.append(np.stack(per, 1))
    return np.stack(text, 1), np.stack(audio, 2)
