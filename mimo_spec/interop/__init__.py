"""Hugging Face interop."""
