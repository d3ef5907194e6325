"""Audio I/O, ring buffers, echo cancellation, VAD and wav handling. Never imports engine.models.

- ring.RingBuffer: lock-free SPSC float32 ring (C) between device callbacks and the model loop.
- io: PortAudio devices and callback streams (`list_devices`, `open_duplex`) bound to rings.
- aec: `EchoCanceller` (libspeexdsp: AEC + residual-echo suppression + denoise), `estimate_delay`.
- vad: `Vad`, `Endpointer` (webrtcvad end-of-turn detection, 24k -> 16k).
- wav: `load_audio`, `read_wav`, `write_wav`; resample: `resample`, `StreamingResampler`.
- opus: `OggOpusWriter`, `OggOpusReader` (libopus via cffi; the server's Ogg/Opus streams).
Submodules are imported on demand, so a missing optional library only matters where it is used.
"""
