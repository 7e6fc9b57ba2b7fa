"""reparam: YOLOv9 dual (PGI) checkpoints to validated, registered deploy models."""

__version__ = "0.1.0"
