"""Bridges from veofast's fused ops to other libraries' models (``veofast.integrations.transformers``).

Integrations swap module *instances* and register functions through the other library's public extension points;
they never patch library source or classes.
"""
