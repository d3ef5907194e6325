"""Audio I/O, ring buffers, echo cancellation, VAD and wav handling. Never imports engine.models."""
