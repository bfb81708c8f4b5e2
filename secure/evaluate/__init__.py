"""Measure compiled models by running them: the fidelity report and HE range calibration."""
