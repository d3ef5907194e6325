"""The embedded tiny model: the real file layout and structure, small random weights.

`ensure_tiny_model()` builds, once, a model directory that `hub.resolve_model("tiny")` and every
test or command can use without a download:

    model.safetensors                              LM, `lm.random_state_dict(LmConfig.tiny(), seed)`
    tokenizer-e351c8d8-checkpoint125.safetensors   Mimi, `mimi.tiny_state_dict(MimiConfig.tiny(), seed)`
    tokenizer_spm_32k_3.model                      SentencePiece, 1000 pieces trained on the text below
    voices/<18 names>.pt                           torch-format voice prompts like the released ones
    engine_config.json                             {"lm": LmConfig.tiny(), "mimi": MimiConfig.tiny()}
    README.md                                      says it is random and babbles

The build is deterministic (fixed seeds, single-threaded SentencePiece training) and atomic (a temp
directory renamed into place), in `$PERSONAPLEX_CACHE/tiny-v1` (default
`~/.cache/personaplex-engine/tiny-v1`). A `.build_id` stamp (a hash of the generator code and
configs) makes a stale copy rebuild itself when the generators change.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .filenames import VOICE_NAMES

__all__ = ["ensure_tiny_model", "build_once", "tiny_dir", "TINY_NAME", "TINY_SEED", "TINY_CORPUS"]

TINY_NAME = "tiny-v1"
TINY_SEED = 20240601
_BUILD_ID = ".build_id"
_VOICE_FRAMES = (11, 21)  # voice prompts of 11..20 codes frames -> N = 10..19 stored embeddings

# Training text of the tiny SentencePiece model (written for this project, plain English).
TINY_CORPUS = """\
<system> You are a wise and friendly teacher. Answer questions or provide advice in a clear and engaging way. <system>
<system> Answer questions clearly and concisely. Listen carefully to what the user says, then respond directly. Stay on topic. Be concise. <system>
<system> You enjoy having a good conversation. Ask about the other person's day and share small stories. <system>
<system> You work for a bakery called Morning Crumb and your name is Ada. Information: we open at seven and close at six. <system>
Hello there, how are you doing today? I am doing well, thank you for asking.
Could you tell me what the weather will be like tomorrow morning in the city?
It looks like rain in the afternoon, so you might want to bring an umbrella with you.
What time does the train leave for the coast on Saturday? The first one leaves at eight fifteen.
I would like to order a large coffee with milk and two slices of lemon cake, please.
Sorry, I did not quite catch that. Could you say it again a little more slowly?
The library is next to the old post office, just across the bridge from the market square.
My sister is learning to play the violin and practices every evening after dinner.
Let us start with the basics: a fraction is a number that describes a part of a whole.
Photosynthesis is how green plants turn sunlight, water and carbon dioxide into sugar and oxygen.
If you mix blue and yellow paint together, you will get a shade of green.
The museum has a new exhibition about the history of flight, from kites to rockets.
Remember to drink enough water, get some sleep, and take short breaks while you study.
Our store accepts cards and cash, and returns are possible within thirty days with a receipt.
I think the best way to learn a language is to speak it every day, even if only for a few minutes.
The recipe needs flour, butter, sugar, three eggs, a pinch of salt and some fresh berries.
Yesterday we walked through the forest and saw a family of deer near the river.
Can you recommend a good book for a long journey? Something light and funny would be perfect.
The meeting has been moved to Thursday at half past two in the small conference room.
Computers store information as bits, which are ones and zeros arranged in long patterns.
When the music started, everyone in the room stood up and began to dance.
Please hold the line for a moment while I check your reservation in our system.
The mountain path is steep and rocky, so wear good shoes and start early in the day.
Honestly, that sounds like a great plan. Let me know if you need any help with it.
She painted the kitchen a warm orange colour and hung plants by the window.
Thank you very much for calling. Have a wonderful evening and take care.
Why is the sky blue? Sunlight scatters in the air, and blue light scatters the most.
Numbers like one, two, three, four, five, six, seven, eight, nine and ten are easy to say.
The quick brown fox jumps over the lazy dog while the cat sleeps on the warm windowsill.
Good morning! Did you sleep well? I made tea and toast if you would like some breakfast.
We should probably leave soon, otherwise we will miss the beginning of the film.
Questions are always welcome. There is no such thing as a silly question in this class.
The garden needs watering every other day during the summer, especially the tomatoes.
Astronomers use large telescopes to observe distant galaxies, stars and planets.
Could you spell your last name for me, please? Thank you, I have updated your details.
Right, so the answer is forty two, but let us check the steps once more together.
The children built a sandcastle on the beach and decorated it with shells and seaweed.
Turn left at the traffic lights, then continue straight until you see the pharmacy.
I am not sure about that, but I can find out and call you back this afternoon.
Exercise, fresh vegetables and a regular routine can make a real difference to your health.
Wow, that is amazing news! Congratulations on the new job, you really deserve it.
Okay, yes, no, maybe, sure, absolutely, of course, right, well, hmm, I see, great.
"""

_README = """\
# PersonaPlex tiny model (random weights)

Generated by `engine.tiny.ensure_tiny_model()`; not a trained model. It has the file layout and the
structure of nvidia/personaplex-7b-v1 (17 token streams, delays, depformer, Mimi codec with
24 kHz / 1920-sample frames, 18 voice presets) with small widths and deterministic random weights,
so every command and test runs without a download. Its speech is BABBLE and its text is random
word pieces: use it to test the engine, never to judge output quality.

Files: model.safetensors (LM), tokenizer-e351c8d8-checkpoint125.safetensors (Mimi),
tokenizer_spm_32k_3.model (SentencePiece, 1000 pieces; ids 0..3 = <unk>/EPAD, <s>, </s>, <pad>),
voices/<NAME>.pt (voice prompts: embeddings [N,1,1,D] bf16 + token ring cache [1,17,4] int64),
engine_config.json (LmConfig / MimiConfig fields).
"""


def tiny_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    base = Path(cache_dir) if cache_dir is not None else Path(
        os.environ.get("PERSONAPLEX_CACHE") or Path.home() / ".cache" / "personaplex-engine")
    return base.expanduser() / TINY_NAME


def _build_id() -> str:
    """Hash of everything that determines the files: generator sources, configs, seeds, corpus."""
    from .models import lm as lm_mod
    from .models import mimi as mimi_mod
    from . import _torchpt
    h = hashlib.sha256()
    for part in (TINY_NAME, str(TINY_SEED), str(_VOICE_FRAMES), TINY_CORPUS,
                 inspect.getsource(lm_mod.random_state_dict), inspect.getsource(mimi_mod.tiny_state_dict),
                 json.dumps(lm_mod.LmConfig.tiny().to_dict(), sort_keys=True),
                 json.dumps(mimi_mod.MimiConfig.tiny().to_dict(), sort_keys=True),
                 inspect.getsource(_make_voices), inspect.getsource(_train_spm),
                 inspect.getsource(_torchpt.save)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _is_complete(d: Path, build_id: str) -> bool:
    from .filenames import CONFIG_FILE, LM_FILE, MIMI_FILE, TOKENIZER_FILE
    if read_build_id(d) != build_id:
        return False
    names = (LM_FILE, MIMI_FILE, TOKENIZER_FILE, CONFIG_FILE)
    return all((d / n).is_file() for n in names) and all(
        (d / "voices" / f"{v}.pt").is_file() for v in VOICE_NAMES)


def ensure_tiny_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the tiny model directory, building it first if it is missing or stale.

    Deterministic: the same engine version produces byte-identical files. Safe against concurrent
    builders (each builds in its own temp directory; the first rename wins).
    """
    build_id = _build_id()
    return build_once(tiny_dir(cache_dir), build_id, _build, lambda d: _is_complete(d, build_id))


def build_once(final: Path, build_id: str, build, is_complete) -> Path:
    """Build a generated model directory atomically: `build(tmp)` fills a temp sibling of `final`,
    which gets a `.build_id` stamp and is renamed into place. `is_complete(dir)` (stamp and files
    present) says whether a copy can be used as it is: then nothing is built. A stale copy is
    moved aside first; when concurrent builders race, the first rename wins. Returns `final`."""
    if is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        (tmp / _BUILD_ID).write_text(build_id + "\n")
        if final.exists():  # stale or incomplete: move it aside first
            if is_complete(final):  # another process just finished
                return final
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}-old-", dir=final.parent))
            try:
                os.replace(final, old / "x")
            except OSError:
                pass
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not is_complete(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def read_build_id(d: Path) -> str | None:
    """The `.build_id` stamp of a generated directory, or None."""
    try:
        return (d / _BUILD_ID).read_text().strip()
    except OSError:
        return None


def _build(out: Path) -> None:
    from safetensors.numpy import save_file

    from .filenames import CONFIG_FILE, LM_FILE, MIMI_FILE, TOKENIZER_FILE
    from .models.lm import LmConfig, random_state_dict
    from .models.mimi import MimiConfig, tiny_state_dict

    lm_cfg, mimi_cfg = LmConfig.tiny(), MimiConfig.tiny()
    lm_sd = random_state_dict(lm_cfg, seed=TINY_SEED)
    save_file({k: np.ascontiguousarray(v) for k, v in sorted(lm_sd.items())}, str(out / LM_FILE))
    mimi_sd = tiny_state_dict(mimi_cfg, seed=TINY_SEED + 1)
    save_file({k: np.ascontiguousarray(v) for k, v in sorted(mimi_sd.items())}, str(out / MIMI_FILE))
    _train_spm(out / TOKENIZER_FILE, lm_cfg.text_card)
    config = {"lm": lm_cfg.to_dict(), "mimi": mimi_cfg.to_dict()}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "README.md").write_text(_README)
    _make_voices(out / "voices", out / LM_FILE, lm_cfg)


def _train_spm(path: Path, vocab_size: int) -> None:
    """Unigram SentencePiece with the released model's special ids (0 <unk> = EPAD, 1 <s>, 2 </s>,
    3 <pad> = PAD) and byte fallback, trained single-threaded on TINY_CORPUS (deterministic)."""
    import io

    import sentencepiece as spm

    # in memory: a file-based run would record its temp paths in the model (not reproducible).
    # The text plus an upper-case copy has enough distinct substrings for 1000 unigram pieces.
    lines = (TINY_CORPUS + TINY_CORPUS.upper()).splitlines()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1,
        shuffle_input_sentence=False, input_sentence_size=0, hard_vocab_limit=True,
        split_digits=True, minloglevel=2)
    path.write_bytes(model.getvalue())


def _make_voices(out: Path, lm_path: Path, lm_cfg) -> None:
    """18 voices in the released `.pt` form: per voice, deterministic random agent codes are turned
    into the prompt's summed input embeddings (N,1,1,D) bf16 and token ring (1,17,4) int64 by the
    generator itself (`LmGen.voice_prompt_from_codes`), exactly what the reference saves."""
    import mlx.core as mx

    from . import _torchpt
    from .models.gen import LmGen
    from .models.lm import LM

    lm = LM.from_file(lm_path, config=lm_cfg, dtype=mx.float32)
    gen = LmGen(lm)
    out.mkdir(parents=True, exist_ok=True)
    n_cb = lm_cfg.n_q // 2
    for i, name in enumerate(VOICE_NAMES):
        rng = np.random.default_rng([TINY_SEED, i])
        frames = int(rng.integers(*_VOICE_FRAMES))
        codes = rng.integers(0, lm_cfg.card, size=(n_cb, frames), dtype=np.int64)
        voice = gen.voice_prompt_from_codes(codes)
        emb = np.asarray(voice.embeddings, np.float32)[:, None, None, :]
        _torchpt.save({"embeddings": _torchpt.BFloat16(emb), "cache": voice.cache[None].astype(np.int64)},
                      out / f"{name}.pt")
