"""poolscout's domain layer, grouped by concern: `core` (registries, config, IO, run
directory), `data` (pools, formats, images, oracles, exports), `models` (detectors, heads,
losses, inference, training), `acquisition` (signal/selector/strategy registries),
`methods` (one module per published method), `evaluation` (metrics, report).

Nothing in this package imports Ray; `jobs/` decides where the functions here run.
"""
__version__ = "0.1.0"
