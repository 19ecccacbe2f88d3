"""Model export: checkpoints -> HF reference + ONNX graphs (fp32, int8) for the Triton repository.

``python -m export --model whisper-base --out build/models/whisper-base``
"""

from .common import ExportError

MODELS = {
    "whisper-base": "whisper",
}

__all__ = ["ExportError", "MODELS", "export_model"]


def export_model(model: str, out, **kwargs):
    """Export ``model`` (a key of MODELS) into ``out``; returns the output directory."""
    family = MODELS.get(model)
    if family == "whisper":
        from . import whisper

        return whisper.export(model, out, **kwargs)
    raise ExportError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
