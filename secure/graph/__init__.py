"""Capture a model as a small IR graph and rewrite it into MPC- and HE-friendly forms."""
