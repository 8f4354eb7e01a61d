"""Load tests, fault injection, benchmarks and reports."""
