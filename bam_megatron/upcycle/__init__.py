"""The Mix phase: pure mapping rules on tensors, seed checks, the output plan, and the streamed mix."""
