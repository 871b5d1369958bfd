"""Quantisation: calibration statistics, quantisers and the integer arithmetic (DESIGN §4)."""
