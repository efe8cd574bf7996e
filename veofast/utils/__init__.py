"""veofast.utils"""
