"""From diagnostics to smaller models: rank allocation, calibration, whitening, low-rank modules, streaming, sweeps."""
