from dynamo_core.frontend.main import main

main()
