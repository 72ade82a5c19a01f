"""Data: shape generators, text corpora, PTB reader and the checksummed downloader."""
