"""Infrastructure every layer uses: plug-in registries, typed config, atomic IO, the run directory.
"""
