"""The library in one page (the README shows this file): run `python examples/library.py` from the
repository root; it reads examples/hello.wav and writes reply*.wav here."""
import numpy as np

import engine
from engine.audio.wav import load_audio, write_wav

model = engine.PersonaPlex.load("tiny")             # or "nvidia/personaplex-7b-v1", quantize=8
reply = model.respond("examples/hello.wav", voice="NATF2", system_prompt="assistant+focused", max_steps=75, seed=1)
print(reply.text, reply.audio.shape, reply.input_info)   # 24 kHz mono float32; what the input was
write_wav("reply.wav", reply.audio)

chunks = []                                          # one chunk per decoded 80 ms frame: play each as it comes
for chunk in model.respond_stream("examples/hello.wav", voice="NATF2"):
    chunks.append(chunk.samples)
write_wav("reply_stream.wav", np.concatenate(chunks))

resp, diag = model.respond_diagnostic("examples/hello.wav")   # per-stage timings, entropies, hidden stats
print(f"step p50 {diag.summary()['step_p50_ms']:.1f} ms")

mic, _ = load_audio("examples/hello.wav")            # continuous: any block size in, 1920-sample blocks out
blocks = (mic[i:i + 1000] for i in range(0, len(mic), 1000))
write_wav("reply_realtime.wav", np.concatenate(list(model.respond_realtime(blocks, voice="NATF2"))))

# Full duplex: source="device", sink="device" for the microphone and the speaker (with echo cancellation).
with model.session(source="examples/hello.wav", sink="reply_duplex.wav", voice="NATM0") as s:
    for ev in s.events():
        if ev.kind == "text":
            print(ev.value, end="", flush=True)
print()
model.close()
