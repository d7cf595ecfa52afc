"""The storage side of every method (docs/FORMAT.md): packed layouts, their validation and decoding, bit
packing, and the per-matrix report row.

The bottom layer of the package: it imports NumPy and sagekit.errors only, so the kernels, the readers and
the quantisers can all depend on one definition of what the bytes mean (the import-linter contracts in
pyproject.toml hold every other package to that).
"""
