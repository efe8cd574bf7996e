"""veofast.checkpoint"""
