"""mpq: mixed-precision quantisation and patch-based scheduling for Cortex-M microcontrollers."""

__version__ = "0.1.0"
