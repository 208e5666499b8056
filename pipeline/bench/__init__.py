"""Benchmarks: Table 10's frames/s (`speed`, a DVC stage) and the head, trainer and prepare benchmarks,
all timed side by side in turns (`timing`)."""
