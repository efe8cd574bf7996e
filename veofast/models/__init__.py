"""veofast.models"""
