"""Reading (and committing) a run directory: one band below training, inference and interop."""
