"""The gRPC service (asr.v1.Asr, health, reflection): request parsing into core options,
RPC handlers and response builders over gateway.asr and analysis."""
