"""The test suite: pytest and hypothesis, protocols against plaintext, nodes as real processes."""
