"""Benchmarks (`make bench`): each prints name, value, same-run baseline and ratio; never run by CI."""
