"""Workflows behind ``gateskip <command>``: plain functions over the library, one per command.

The CLI (``gateskip.cli``) builds each command's flags from its function's signature and docstring.
"""
