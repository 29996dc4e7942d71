"""Triton Inference Server: the embedded process, the client pool, one served model."""
