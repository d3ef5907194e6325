"""File names of a PersonaPlex model directory, in the two layouts the engine reads.

A leaf module: `engine.hub` (which finds and checks these files), `engine.tiny` (which writes them
for the embedded tiny model) and `engine.persona` import it, and it imports nothing of the engine.

- "reference": the released repository `nvidia/personaplex-7b-v1` (one bf16 `model.safetensors`).
- "mlx": the converted MLX checkpoints of the Swift PersonaPlex demo
  (`aufklarer/PersonaPlex-7B-MLX-4bit` / `-8bit`): the LM split into temporal / depformer /
  embeddings files, MLX affine-quantized, plus `config.json` and one safetensors file per voice.
"""

DEFAULT_REPO = "nvidia/personaplex-7b-v1"
LM_FILE = "model.safetensors"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_FILE = "tokenizer_spm_32k_3.model"
VOICES_ARCHIVE = "voices.tgz"
VOICES_DIR = "voices"
CONFIG_FILE = "engine_config.json"      # ours: LmConfig / MimiConfig of a non-default model

# The converted MLX layout (see engine/models/mlx_layout.py).
MLX_OWNER = "aufklarer"                 # repo ids under this owner use the MLX layout
MLX_REPOS = ("aufklarer/PersonaPlex-7B-MLX-8bit", "aufklarer/PersonaPlex-7B-MLX-4bit")
MLX_TEMPORAL_FILE = "temporal.safetensors"
MLX_DEPFORMER_FILE = "depformer.safetensors"
MLX_EMBEDDINGS_FILE = "embeddings.safetensors"
MLX_MIMI_FILE = "mimi.safetensors"      # a verbatim copy of MIMI_FILE
MLX_CONFIG_FILE = "config.json"         # the converter's config (dims, delays, quantization, voices)
MLX_VOICE_SUFFIX = ".safetensors"       # voices/<NAME>.safetensors: `embeddings` + `cache`

# The 18 released voice presets: NATF0-3, NATM0-3 (natural), VARF0-4, VARM0-4 (variety).
VOICE_NAMES = tuple([f"NATF{i}" for i in range(4)] + [f"NATM{i}" for i in range(4)]
                    + [f"VARF{i}" for i in range(5)] + [f"VARM{i}" for i in range(5)])
