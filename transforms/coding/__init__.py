"""Arithmetic coding of scored chunks, payloads, and decoding by bit-exact replay."""
