"""The gRPC API: `.proto` sources and the Python code generated from them (`make proto`)."""
