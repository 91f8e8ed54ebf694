"""Jobs around training: checkpoint evaluation, export, scaling laws, benchmarks."""
