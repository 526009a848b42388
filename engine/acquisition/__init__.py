"""The plug-in mechanism of acquisition: signal, selector and strategy registries.

The registries are filled by importing `poolscout.engine.methods`, which they do lazily on
the first lookup; nothing in this package imports a method.
"""
