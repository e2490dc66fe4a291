"""The measurement layer: drivers, quality, experiments, profiling."""
