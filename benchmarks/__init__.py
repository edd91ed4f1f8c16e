"""Side-by-side benchmarks of our engine against the seed and sentence-transformers."""
