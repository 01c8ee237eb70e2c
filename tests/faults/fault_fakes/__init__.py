"""Components for the fault suite's `dynamo serve` cases (importable as `python -m`)."""
