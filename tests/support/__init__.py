"""Shared helpers for integration tests: free ports, a test CA, local upstream servers, a `bastion serve`
subprocess. Everything listens on 127.0.0.1 only."""
