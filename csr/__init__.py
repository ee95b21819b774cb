"""CSR: Contrastive Sparse Representation (Wen, Wang et al., ICML 2025) — the shared library.

Stage scripts at the repository root and in inference/, retrieval/, train/ parse flags and call into here.
"""
__version__ = "0.1.0"
