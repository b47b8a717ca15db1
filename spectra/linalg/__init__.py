"""Linear algebra over tensors and operators: Lanczos (single and block), Hessian-vector products, SVDs."""
