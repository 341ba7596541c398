"""One module per data pipeline; `fastcifar.data.make_loaders(..., loader=NAME)` picks one."""
