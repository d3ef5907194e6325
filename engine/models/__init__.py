"""Networks: Mimi codec, PersonaPlex LM, generator, quantization. Never imports engine.audio."""
