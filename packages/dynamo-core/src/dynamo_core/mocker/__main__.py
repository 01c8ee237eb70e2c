"""`python -m dynamo_core.mocker`."""

from dynamo_core.mocker.main import main

main()
