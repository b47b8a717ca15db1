"""What spectra keeps on disk: atomic writes, the snapshot store, analysis stores and run folders."""
