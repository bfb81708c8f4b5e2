"""The computing side of the service: the party node and the HE node, their shared serving
layer, configuration, dealing, file integrity, development certificates and the launcher
of local clusters.
"""
