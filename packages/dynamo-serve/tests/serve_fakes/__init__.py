"""Small components for dynamo-serve's tests: each has a `Deployment`, a `build_parser()` and a
`main()` that serves with the runtime, as a real component module does."""
