"""polymorph: measure and remove seed-to-seed residual-stream rotations."""

__version__ = "0.1.0"
