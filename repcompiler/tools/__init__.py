"""Tools built on the library: the demo, profiling, progress and branch similarity."""
