"""`python -m poolscout.jobs COMMAND RUN_DIR [options]`: the CLI without the console script,
e.g. under `ray job submit -- python -m poolscout.jobs cycle /shared/runs/coco ...`.

The job modules themselves never import the CLI (no import circle); this is the one entry.
"""
from poolscout.jobs.cli import main

main()
