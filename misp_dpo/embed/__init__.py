"""Cores of the embed stage: input readers, image decoding, the open_clip encoder, and the demo corpus."""
