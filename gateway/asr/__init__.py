"""The ASR core: bytes -> 16 kHz audio -> VAD windows -> features -> Triton encoder/decoder ->
beam search with hotwords -> text, timestamps, ITN. No gRPC server code lives here."""
