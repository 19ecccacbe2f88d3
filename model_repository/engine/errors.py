"""Errors the engine reports per request."""

INVALID_ARG = "INVALID_ARG"   # -> gRPC INVALID_ARGUMENT
NOT_FOUND = "NOT_FOUND"       # the sequence has no state (never STARTed, ENDed or evicted)
UNAVAILABLE = "UNAVAILABLE"   # max_sequences are live: retry later
INTERNAL = "INTERNAL"
CANCELLED = "CANCELLED"       # the client cancelled the request (the search model stops its window)


class RequestError(Exception):
    """A problem with one request: reported to its client, never fails the others.

    code: the TritonError code the client sees (INVALID_ARG -> gRPC INVALID_ARGUMENT, ...)."""

    def __init__(self, message: str, code: str = INVALID_ARG):
        super().__init__(message)
        self.code = code
