"""Local launchers: a tritonserver process from the pip-installed binary, and the local stack
(Triton + gateway) behind `make serve` and `make demo`."""
