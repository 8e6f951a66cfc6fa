"""What tests and benchmarks share: in-memory fakes (``fakes``: a runtime, an agent) and the
harness for a real gateway process (``process``)."""
