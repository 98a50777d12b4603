"""The hostile-image corpus: shared with the benchmarks (fuzz, leak, decode memory), so it lives in
``benchmarks/support/corpus.py``; re-exported here for the tests."""

from benchmarks.support.corpus import Case, base_image, encode, fuzz_seeds, make_bad_corpus, mutate, png_bytes

__all__ = ["Case", "base_image", "encode", "fuzz_seeds", "make_bad_corpus", "mutate", "png_bytes"]
