"""Models of any supported architecture: the component registry, loading, and the compressed-folder format."""
