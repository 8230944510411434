"""Speculative decoding: prefill, propose, verify, accept and commit inside one jitted while_loop."""
