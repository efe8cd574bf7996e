"""veofast.optim"""
