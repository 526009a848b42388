"""Detectors, their heads and losses, inference with the prediction contract, training loops.
"""
