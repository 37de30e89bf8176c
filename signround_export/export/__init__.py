"""Exporters: each reads a quantized checkpoint and writes one deployable format."""
