"""Pools and what flows in and out of them: formats, image decoding, synthetic pools, oracles, exports.
"""
