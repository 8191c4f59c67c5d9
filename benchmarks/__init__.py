"""Measurements through a real server: throughput, latency and the effect of dynamic batching."""
