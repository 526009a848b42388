"""Metrics (pycocotools) and the report.
"""
