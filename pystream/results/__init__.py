"""Results: the run directory, its schema, reader and writer, and summaries."""
