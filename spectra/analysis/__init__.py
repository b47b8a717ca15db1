"""Analyses of weights, gradients and Hessians: spectra and heavy tails, gradient subspaces, Hessian gaps and
densities."""
