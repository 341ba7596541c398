"""What the results JSONs hold, as the renderer reads them: names shared with the commands that write them."""

from __future__ import annotations

# The start-up pieces `bench_startup` records per run, in the order a run passes through them.
PIECES = ["python_and_imports_s", "setup_s", "compiler_import_s", "betons_check_s", "loaders_s", "model_s",
          "compile_s", "first_batch_s", "startup_s"]

# The data pipeline's share of start-up: FFCV's import and the beton check, the train Loader (its numba
# compilation), FFCV's first epoch starting (the first batch read, compiled and made).
DATA_PIPELINE = ("betons_check_s", "loaders_s", "first_batch_s")
