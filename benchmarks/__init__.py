"""Benchmarks of petsage-grpc against its peers: ``python -m benchmarks.run``."""
