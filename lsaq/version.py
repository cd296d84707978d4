"""The version of lsaq's numerics and records: part of every record and of the pipeline's cache keys."""

__version__ = "0.2.0"
