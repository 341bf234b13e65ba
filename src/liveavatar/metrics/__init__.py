"""Measures of generated videos (the toy world's exact lip-sync and identity measures; GenBench)."""
