"""Request encoding and response decoding, one module per protocol (``modelarts`` first)."""
