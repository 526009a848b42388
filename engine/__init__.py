"""poolscout's domain layer: pool formats, detectors, signals, selectors, strategies.

Nothing in this package imports Ray; `jobs/` decides where the functions here run.
"""
__version__ = "0.1.0"
