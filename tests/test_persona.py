"""engine.persona on the embedded tiny model: presets, voices (.pt and wav), system prompts, text display."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest

from engine import _torchpt, hub, persona
from engine.errors import AudioFormatError, ConfigError, CorruptCheckpoint, UnknownVoice


@pytest.fixture(scope="module")
def files():
    return hub.resolve_model("tiny")


@pytest.fixture(scope="module")
def sp(files):
    return persona.load_tokenizer(files.tokenizer)


@pytest.fixture(scope="module")
def mimi(files):
    from engine.models.mimi import Mimi
    return Mimi.from_file(files.mimi, config=files.mimi_config())


def test_voice_names_and_prompt_presets():
    assert persona.VOICES == ("NATF0", "NATF1", "NATF2", "NATF3", "NATM0", "NATM1", "NATM2", "NATM3",
                              "VARF0", "VARF1", "VARF2", "VARF3", "VARF4",
                              "VARM0", "VARM1", "VARM2", "VARM3", "VARM4")
    assert persona.PROMPTS["assistant+focused"] == (
        "Answer questions clearly and concisely. Listen carefully to what the user says, then respond "
        "directly. Stay on topic. Be concise.")
    assert persona.resolve_prompt(None) == persona.PROMPTS[persona.DEFAULT_PROMPT]
    assert persona.resolve_prompt("casual") == persona.PROMPTS["casual"]
    assert persona.resolve_prompt("Talk like a pirate.") == "Talk like a pirate."
    with pytest.raises(ConfigError):
        persona.resolve_prompt(5)


@pytest.mark.parametrize("text,wrapped", [
    ("Be nice.", "<system> Be nice. <system>"),
    ("  Be nice.\n", "<system> Be nice. <system>"),
    ("", "<system>  <system>"),
    ("<system> already <system>", "<system> already <system>"),
    ("<system> only the start", "<system> <system> only the start <system>"),
])
def test_wrap_system_prompt(text, wrapped):
    assert persona.wrap_system_prompt(text) == wrapped


def test_tiny_tokenizer_has_the_real_special_ids(sp):
    from engine.models.lm import LmConfig
    assert sp.get_piece_size() == LmConfig.tiny().text_card == 1000
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)


def test_encode_system_prompt(sp):
    text = persona.PROMPTS["assistant+focused"]
    ids = persona.encode_system_prompt(text, sp)
    assert ids == sp.encode("<system> " + text + " <system>")
    assert all(isinstance(i, int) and 4 <= i < 1000 for i in ids)  # no BOS/EOS/PAD, in vocab
    empty = persona.encode_system_prompt("", sp)
    assert empty == sp.encode("<system>  <system>") and len(empty) > 0
    # the tags are ordinary pieces, so the prompt ids start and end with the same run
    tag = sp.encode("<system>")
    assert ids[: len(tag)] == tag
    # any text, including characters outside the tiny vocabulary (byte fallback), encodes
    assert len(persona.encode_system_prompt("Grüße, 日本 🙂", sp)) > 0


def test_decode_text_token(sp):
    assert persona.decode_text_token(0, sp) == "" and persona.decode_text_token(3, sp) == ""
    assert persona.decode_text_token(1, sp) == "" and persona.decode_text_token(2, sp) == ""
    text = "Hello there, how are you doing today?"
    ids = sp.encode(text)
    shown = "".join(persona.decode_text_token(i, sp) for i in ids)
    assert shown == " " + text
    assert any(persona.decode_text_token(i, sp).startswith(" ") for i in ids)
    assert all("\u2581" not in persona.decode_text_token(i, sp) for i in range(1000))


def test_load_preset_voice(files):
    for spelling in ("NATF2", "natf2", "NATF2.pt"):
        v = persona.load_voice(spelling, files)
        assert isinstance(v, persona.VoicePrompt)
        assert v.embeddings.dtype == np.float32 and v.embeddings.shape[1] == 128
        assert 10 <= v.embeddings.shape[0] <= 19
        assert v.cache.shape == (17, 4) and v.cache.dtype == np.int64
    raw = _torchpt.load(files.voices_dir / "NATF2.pt")
    np.testing.assert_array_equal(v.embeddings, raw["embeddings"][:, 0, 0])
    np.testing.assert_array_equal(v.cache, raw["cache"][0])
    # presets differ
    assert not np.array_equal(persona.load_voice("VARM4", files).embeddings[:5], v.embeddings[:5])
    # a path to a .pt works too
    p = persona.load_voice(str(files.voices_dir / "VARM4.pt"), files)
    assert p.cache.shape == (17, 4)


def test_unknown_voice_lists_valid_names(files, tmp_path):
    with pytest.raises(UnknownVoice) as e:
        persona.load_voice("NATF9", files)
    for name in persona.VOICES:
        assert name in str(e.value)
    with pytest.raises(UnknownVoice, match="NATM0"):
        persona.load_voice(str(tmp_path / "nope.wav"), files)
    (tmp_path / "v.mp3").write_bytes(b"x")
    with pytest.raises(UnknownVoice, match=r"\.wav"):
        persona.load_voice(str(tmp_path / "v.mp3"), files)


def test_preset_missing_from_voices_dir(files, tmp_path):
    import dataclasses
    empty = dataclasses.replace(files, voices_dir=tmp_path)
    with pytest.raises(UnknownVoice, match="re-download"):
        persona.load_voice("NATF0", empty)


def test_corrupt_voice_files(tmp_path):
    bad = tmp_path / "bad.pt"
    _torchpt.save({"embeddings": np.zeros((3, 1, 1, 8), np.float32)}, bad)
    with pytest.raises(CorruptCheckpoint, match="'cache'"):
        persona.load_voice(str(bad))
    _torchpt.save({"embeddings": np.zeros((3, 8, 8), np.float32),
                   "cache": np.zeros((1, 17, 4), np.int64)}, bad)
    with pytest.raises(CorruptCheckpoint, match=r"\[N, 1, 1, D\]"):
        persona.load_voice(str(bad))
    _torchpt.save({"embeddings": np.zeros((3, 1, 1, 8), np.float32),
                   "cache": np.zeros((1, 17, 3), np.int64)}, bad)
    with pytest.raises(CorruptCheckpoint, match="17, 4"):
        persona.load_voice(str(bad))
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("bad/data.pkl", b"garbage")
    with pytest.raises(CorruptCheckpoint):
        persona.load_voice(str(bad))


def _speechy(seconds: float, level: float, rate: int = 24000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    env = 0.5 * (1 + np.sin(2 * np.pi * 2.5 * t))
    return (level * env * (np.sin(2 * np.pi * 180 * t) + 0.5 * np.sin(2 * np.pi * 360 * t))).astype(np.float32)


def test_normalize_loudness_hits_target():
    import pyloudnorm
    meter = pyloudnorm.Meter(24000)
    for level in (0.01, 0.5):
        x = _speechy(3.0, level)
        before = meter.integrated_loudness(x.astype(np.float64))
        y = persona.normalize_loudness(x, 24000)
        assert y.dtype == np.float32 and y.shape == x.shape
        assert abs(before - persona.TARGET_LUFS) > 5
        assert meter.integrated_loudness(y.astype(np.float64)) == pytest.approx(persona.TARGET_LUFS, abs=0.05)
        # a pure gain: the waveform shape is unchanged
        np.testing.assert_allclose(y / y.max(), x / x.max(), atol=1e-5)
    silent = np.zeros(24000, np.float32)
    assert np.array_equal(persona.normalize_loudness(silent, 24000), silent)


def test_wav_voice_matches_mimi_encoding(files, mimi, tmp_path):
    import mlx.core as mx

    from engine.audio.wav import write_wav
    x = _speechy(1.9, 0.05, 48000)
    path = tmp_path / "me.wav"
    write_wav(path, np.stack([x, x], axis=1), sample_rate=48000, sample_format="float32")
    with pytest.raises(ConfigError, match="mimi"):
        persona.load_voice(str(path), files)
    v = persona.load_voice(str(path), files, mimi=mimi)
    frames = -(-int(1.9 * 24000) // 1920)
    assert v.codes.shape == (8, frames) and v.codes.dtype == np.int64
    assert v.codes.min() >= 0 and v.codes.max() < 2048
    # the same pipeline by hand: 24 kHz mono, -24 LUFS, zero-padded frames, whole-signal encode
    from engine.audio.wav import load_audio
    y, _ = load_audio(path)
    y = persona.normalize_loudness(y, 24000)
    padded = np.zeros(frames * 1920, np.float32)
    padded[: y.size] = y
    ref = np.array(mimi.encode(mx.array(padded[None, None])))[0]
    np.testing.assert_array_equal(v.codes, ref)
    # loudness normalisation matters: a 20 dB quieter recording gives (nearly) the same codes
    write_wav(tmp_path / "quiet.wav", x * 0.1, sample_rate=48000, sample_format="float32")
    q = persona.load_voice(str(tmp_path / "quiet.wav"), files, mimi=mimi)
    assert (q.codes == v.codes).mean() > 0.9
    with pytest.raises(AudioFormatError, match="at least"):
        persona.voice_from_audio(np.zeros(1000, np.float32), mimi)


def test_voice_and_prompt_run_through_the_generator(files, sp):
    """The pieces fit the generator's prompt phases (voice, silence, text, silence) on the tiny LM."""
    import mlx.core as mx

    from engine.models.gen import LmGen
    from engine.models.lm import LM
    lm = LM.from_file(files.lm, config=files.lm_config(), dtype=mx.float32)
    gen = LmGen(lm)
    voice = persona.load_voice("VARF1", files)
    for text in ("", persona.PROMPTS["assistant+focused"]):
        state = gen.new_state(1, seed=0)
        tokens = persona.encode_system_prompt(text, sp)
        gen.run_prompts(state, voice=voice, text_tokens=tokens)
        expected = voice.num_frames + 1 + 6 + len(tokens) + 6  # +1: the first call only sets BOS
        assert state.offset == expected
