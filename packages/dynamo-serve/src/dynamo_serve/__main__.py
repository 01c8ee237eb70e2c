"""`python -m dynamo_serve` is the `dynamo` command."""

from dynamo_serve.cli import main

raise SystemExit(main())
