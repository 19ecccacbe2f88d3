"""Model export: checkpoints -> HF reference + ONNX graphs (fp32, int8) for the Triton repository.

``python -m export --model whisper-base --out build/models/whisper-base``
``python -m export --model glm-asr-nano --checkpoint DIR --out build/models/glm-asr-nano``
"""

from .common import ExportError

MODELS = {
    "whisper-base": "whisper",
    "glm-asr-nano": "glm_asr",  # needs the local checkpoint directory (--checkpoint)
    "glm-asr-tiny": "glm_asr",  # seeded random GlmAsrConfig of the same structure (tests)
}

__all__ = ["ExportError", "MODELS", "export_model"]


def export_model(model: str, out, **kwargs):
    """Export ``model`` (a key of MODELS) into ``out``; returns the output directory."""
    family = MODELS.get(model)
    if family == "whisper":
        from . import whisper

        if kwargs.pop("checkpoint", None) is not None:
            raise ExportError(f"{model} takes no --checkpoint (use --ct2-dir for a local CTranslate2 model)")
        return whisper.export(model, out, **kwargs)
    if family == "glm_asr":
        from . import glm_asr

        if kwargs.pop("ct2_dir", None) is not None:
            raise ExportError(f"{model} takes no --ct2-dir (use --checkpoint DIR)")
        return glm_asr.export(model, out, **kwargs)
    raise ExportError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
