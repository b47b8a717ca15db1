"""spectra: how low-rank weights emerge from low-rank gradients (WeLore), measured and used."""

__version__ = "0.1.0"
