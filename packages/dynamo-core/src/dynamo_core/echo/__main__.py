"""`python -m dynamo_core.echo`."""

from dynamo_core.echo.main import main

main()
