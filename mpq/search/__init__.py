"""Bit search: the per-feature-map scores and the solvers that optimise them (DESIGN §7)."""
