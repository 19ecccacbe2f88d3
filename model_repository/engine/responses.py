"""Triton error responses, shared by the models' thin adapters (1/model.py).

The engine never imports triton_python_backend_utils (it runs without Triton in tests): the
adapters hand their pb_utils module in."""


def error_response(pb_utils, message: str, code: str):
    """An InferenceResponse carrying `message` with the TritonError code named `code`
    (INVALID_ARG, UNAVAILABLE, ...; older backends take the message only)."""
    try:
        error = pb_utils.TritonError(message, getattr(pb_utils.TritonError, code))
    except (AttributeError, TypeError):
        error = pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)
