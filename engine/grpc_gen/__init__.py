"""Python stubs generated from proto/omnistream/v1/omnistream.proto; never edit them by hand.

Regenerate with `python -m omnistream.engine.grpc_gen.regenerate` (tests/api/test_grpc.py checks that
the committed files equal a fresh run). Only this file and regenerate.py are written by people.
"""
