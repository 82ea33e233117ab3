"""Prime Spark: a hybrid edge-cloud AI fleet as code."""

__version__ = "0.1.0"
