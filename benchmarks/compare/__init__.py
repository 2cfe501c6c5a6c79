"""Peer comparison on the throughput workload: see README.md beside this file."""
