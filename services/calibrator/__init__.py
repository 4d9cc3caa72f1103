"""CalibratorService: runs the model block by block and captures what the solvers need."""
