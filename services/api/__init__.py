"""The public gRPC API (`proto/clsa/v1/`): generated stubs, loaded through `stubs.load()`."""
