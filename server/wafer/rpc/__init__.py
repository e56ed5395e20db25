"""The gRPC layer: servicers that validate, translate and map errors; no business logic."""
