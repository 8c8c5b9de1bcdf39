"""Settings for the whole suite, applied before any test module imports torch."""

import os

# The tiny models run fastest on one thread; more threads only fight over this machine's 2 cores
# (a run of 80 steps took 96 s with the default threads beside other work, 12 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
