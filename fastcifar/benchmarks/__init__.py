"""The measurement half: benchmarks of the trainer and its loaders, the stage runner, and the two commands
that run them in order (`make results`: measure.py, `make gpu-check`: gpu_check.py). Imports the training half;
nothing there imports this."""
