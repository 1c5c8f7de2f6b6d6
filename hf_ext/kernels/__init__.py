"""Triton kernels, each with a pure-torch twin of the same algorithm and one dispatch rule (see STYLE.md)."""
