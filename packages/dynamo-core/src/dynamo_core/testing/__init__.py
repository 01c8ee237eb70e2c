"""Test support shared by every package: real-process helpers and the engine conformance kit."""
