"""Compatibility shims for third-party internals fedtune depends on, each gated on the
versions it was tested on."""
