"""File names of a PersonaPlex model directory (the released repository's layout).

A leaf module: `engine.hub` (which finds and checks these files) and `engine.tiny` (which writes
them for the embedded tiny model) both import it, and it imports nothing of the engine.
"""

DEFAULT_REPO = "nvidia/personaplex-7b-v1"
LM_FILE = "model.safetensors"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_FILE = "tokenizer_spm_32k_3.model"
VOICES_ARCHIVE = "voices.tgz"
VOICES_DIR = "voices"
CONFIG_FILE = "engine_config.json"      # ours: LmConfig / MimiConfig of a non-default model
