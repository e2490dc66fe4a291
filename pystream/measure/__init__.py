"""The measurement drivers: cells, quality, the paper experiment, profiling, clocks and memory."""
