"""`python -m dynamo_core.router`."""

from dynamo_core.router.main import main

main()
