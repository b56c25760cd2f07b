"""Applications on top of runs: the demo, sweeps, serving, labelling, reports, advice, export, held-out evaluation and the Python API."""
