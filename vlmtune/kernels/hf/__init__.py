"""Hugging Face integrations of the kernel ops: each file finds one op's modules and swaps their forward."""
