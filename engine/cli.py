"""What the command-line tools share: the default model and the model arguments' help.

Every CLI (`engine.duplex`, `engine.respond`, `engine.profile`) loads `DEFAULT_MODEL` when `--model`
is not given and says so in its `--help`.
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["DEFAULT_MODEL", "MODEL_HELP", "TINY_NOTE", "add_model_args", "add_asr_arg", "note_if_tiny",
           "device_arg", "check_output_file"]

DEFAULT_MODEL = "tiny"

MODEL_HELP = ("tiny: the embedded model with random weights, built on first use (a few seconds) into "
              "~/.cache/personaplex-engine/tiny-v1 ($PERSONAPLEX_CACHE), no download; it babbles. "
              "nvidia/personaplex-7b-v1: the real model (gated: accept its license on Hugging Face, set "
              "HF_TOKEN; ~17 GB download). Or another repo id, or a local directory.")

TINY_NOTE = ("note: --model tiny is the embedded random model: it runs the real loop but babbles. "
             "For the real model: --model nvidia/personaplex-7b-v1 (accept the license on its Hugging Face "
             "page, set HF_TOKEN; ~17 GB download, use --quantize 8 on small GPUs).")


def check_output_file(path: str | None, flag: str) -> None:
    """Before any model work: `path` (a file to write) must name a file in an existing, writable
    directory; raises ConfigError naming `flag` and the fix."""
    import os

    from .errors import ConfigError

    if not path:
        return
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: is a directory; give a file name, e.g. {os.path.join(path, 'reply.wav')}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"{flag} {path}: the directory {parent} does not exist; create it or write elsewhere")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{flag} {path}: the directory {parent} is not writable; write elsewhere")


def add_model_args(p: argparse.ArgumentParser, more_models: str = "") -> None:
    """--model (default DEFAULT_MODEL; `more_models`: what else this tool accepts), --model-dir, --quantize."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=" ".join(filter(None, (MODEL_HELP, more_models, f"Default: {DEFAULT_MODEL}."))))
    p.add_argument("--model-dir", default=None,
                   help="a local directory with the model's files, used instead of --model")
    p.add_argument("--quantize", default="none",
                   help="none | 8 | 4 | a plan name from engine.models.quant (default: none)")


def add_asr_arg(p: argparse.ArgumentParser,
                shows: str = "also show what the user says (`you:` lines, one per utterance)") -> None:
    """--asr [MODEL]: a transcript of what the user says (engine.asr), off unless given."""
    from .asr import DEFAULT_ASR_REPO

    p.add_argument("--asr", nargs="?", const=DEFAULT_ASR_REPO, default=None, metavar="MODEL",
                   help=f"{shows}, recognized in a process of its own so "
                        f"the model's loop never waits for it. MODEL: {DEFAULT_ASR_REPO} (the default when "
                        "--asr is given alone; about 1.6 GB, downloaded through huggingface_hub like the model), "
                        "another repo id or a local directory of a Qwen3-ASR model, or tiny (random weights "
                        "built locally: nonsense text). Needs the asr extra: pip install -e \".[asr]\".")


def note_if_tiny(args) -> None:
    """Tell the user on stderr that the default tiny model babbles, and how to get the real one."""
    if args.model == "tiny" and args.model_dir is None:
        print(TINY_NOTE, file=sys.stderr)


def device_arg(v):
    """--input-device / --output-device: an index ("3") or a name."""
    if v is None:
        return None
    return int(v) if str(v).isdigit() else v
