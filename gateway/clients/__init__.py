"""Programs that call the gateway over gRPC: the CLI, the batch job and the health probe."""
