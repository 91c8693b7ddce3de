"""The gRPC gateway: validates requests, converts proto <-> engine dataclasses, routes to workers."""
